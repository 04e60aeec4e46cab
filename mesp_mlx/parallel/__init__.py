"""Data parallelism over `mlx.launch` ranks: group.py (the process group) and
data_parallel.py (token-exact gradient and loss sums over the ranks)."""
