"""`python -m pg_edge.cli ...`: the same as the `pg-edge` script."""
import sys

from .main import main

sys.exit(main())
