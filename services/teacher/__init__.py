"""services/teacher"""
