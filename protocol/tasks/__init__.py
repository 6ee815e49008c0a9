"""protocol/tasks"""
