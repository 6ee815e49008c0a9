"""trainer/bootstrap"""
