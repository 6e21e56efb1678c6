"""Official PaliGemma checkpoints -> pg_edge converted folders (MLX safetensors)."""
