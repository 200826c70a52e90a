"""Rollout engines (HF on CPU, SGLang on GPU) and the weight sync that feeds them."""
