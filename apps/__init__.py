"""Front ends over pg_edge: the `pg-edge` command line, the local server, desktop examples."""
