"""rlrt"""
