"""trainer/algorithm"""
