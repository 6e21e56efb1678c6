"""Examples over pg_edge, kept in the repository and not installed: `python -m apps.demo`
(what `make demo` runs), the Tk desktop app (apps/desktop), the C++ runner (apps/cpp) and how the
built-in demo model is made (apps/demo_model). The command line (apps/cli) and the server
(apps/server) live here too but install as `pg_edge.cli` and `pg_edge.server`."""
