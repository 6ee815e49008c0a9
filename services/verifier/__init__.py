"""services/verifier"""
