"""The fp32 PyTorch reference pipeline (DDIM + classifier-free guidance) and its recorder."""
