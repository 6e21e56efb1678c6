"""The MLX model (a folder of its own; its files are listed in reading order once they settle)."""
