"""The `pg-edge` verbs, one module each; apps/cli/main.py (pg_edge.cli.main) lists them."""
