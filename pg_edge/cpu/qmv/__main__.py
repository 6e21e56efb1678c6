"""python -m pg_edge.cpu.qmv [build|status]: build the compiled kernels (decode matvecs for
quantized and bf16/fp16 weights, prefill dequantization, GELU, AMX prefill products), or say which
kernels pg_edge would use."""
from __future__ import annotations

import argparse
import sys

from ...errors import PgEdgeError
from . import build as _build
from . import kernel, prefill_kernel, reset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pg_edge.cpu.qmv", description=__doc__)
    ap.add_argument("action", choices=["build", "status"], nargs="?", default="status")
    ap.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = ap.parse_args(argv)
    try:
        if args.action == "build":
            path = _build.build(verbose=args.verbose)
            print(f"built {path}")
            reset()
    except PgEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"decode matvec (quantized, bf16/fp16): {kernel()}")
    print(f"prefill products (quantized, bf16/fp16): {prefill_kernel()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
