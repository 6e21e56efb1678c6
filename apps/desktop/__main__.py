"""`python -m apps.desktop [MODEL] [--adapters DIR] [--image cat.jpg] [--max-tokens 96] [--vae vae.safetensors]`"""
from __future__ import annotations

import argparse
import sys

from pg_edge.cli.commands.run import add_adapters_arg, check_adapters

from . import MAX_TOKENS, defaults_for


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m apps.desktop",
                                description="Open an image, pick a task, see the answer and boxes.")
    p.add_argument("model", nargs="?", default="demo",
                   help="converted folder, mlx-community folder, or hub id (default: the built-in demo model)")
    add_adapters_arg(p)  # the same option as the pg-edge commands
    p.add_argument("--image", default=None, help="image to open at start (default with demo: a sample)")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                   help=f"most tokens per answer (default {MAX_TOKENS}: three segment masks)")
    p.add_argument("--vae", default=None, help="mask decoder for segment (default: in the model folder)")
    args = p.parse_args(argv)
    from pg_edge.errors import PgEdgeError

    try:
        check_adapters(args.adapters)
    except PgEdgeError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        import tkinter as tk
    except ImportError:
        print("the desktop example needs Tk (python3-tk on Debian/Ubuntu, python-tk on Homebrew)",
              file=sys.stderr)
        return 2
    from .app import App

    image = args.image
    if image is None and args.model == "demo":
        from pg_edge.demo import SAMPLES

        image = str(SAMPLES[0])

    try:
        root = tk.Tk()
    except tk.TclError as err:
        print(f"cannot open a window: {err}", file=sys.stderr)
        return 2
    App(root, model=args.model, image=image, gen={"max_tokens": args.max_tokens}, vae=args.vae,
        adapters=args.adapters, defaults=defaults_for(args.model))
    root.mainloop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
