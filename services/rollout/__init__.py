"""services/rollout"""
