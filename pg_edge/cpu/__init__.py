"""The CPU backend: how big products and small ops compute on MLX's CPU (pg_edge.cpu.products, pg_edge.cpu.ops)."""
