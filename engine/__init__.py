"""Pure PyTorch/NumPy building blocks. Nothing here imports Prefect."""
