"""Models: short names and loading through mlx-lm (loading.py), and the real
configurations of supported families for random-weight copies (configs.py)."""
