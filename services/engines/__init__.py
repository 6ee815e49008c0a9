"""services/engines"""
