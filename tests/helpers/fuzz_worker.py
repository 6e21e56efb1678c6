"""Load each folder named on stdin (one per line) with pg_edge and run one tiny forward pass.

Run by tests/hardening/test_fuzz_files.py in a subprocess, so a crash (a signal) or a hang is caught.
Prints one line per case, flushed before and after it:
    START i          about to load case i (the last START before a crash names the culprit)
    OK i             loaded and ran; the logits are finite or the weights were changed
    ERR i message    a PgEdgeError: the clean refusal the test expects for bad files
    BUG i message    any other exception (a traceback a user would have seen)
    LAX i message    pg_edge accepted a shard that the `safetensors` library refuses
"""
import sys
import traceback
from pathlib import Path

import mlx.core as mx


def run_case(i: int, folder: str) -> None:
    from pg_edge.errors import PgEdgeError
    from pg_edge.checkpoint.folder import weight_files
    from pg_edge.checkpoint.loader import load_model
    from pg_edge.checkpoint.safetensors_check import check_safetensors

    try:
        model, config, _ = load_model(folder)
        n = config.num_image_tokens
        s = config.vision.image_size
        feats = model.encode_image(mx.zeros((1, s, s, 3)))
        ids = mx.array([[config.image_token_index] * n + [config.bos_token_id, 5, 6, 7]])
        mx.eval(model(ids, image_features=feats, last_only=True))
    except PgEdgeError as err:
        print(f"ERR {i} {str(err)[:200]}", flush=True)
        return
    except Exception as err:  # noqa: BLE001 - the test reports it
        tb = traceback.format_exc().strip().splitlines()[-3:]
        print(f"BUG {i} {type(err).__name__}: {err} | {' / '.join(tb)}"[:600], flush=True)
        return
    from safetensors import safe_open  # a test dependency (pyproject: test extras)

    try:  # pg_edge accepted it: so must the reference implementation
        for f in weight_files(Path(folder)):
            check_safetensors(f)
            with safe_open(str(f), framework="numpy"):
                pass
    except Exception as err:  # noqa: BLE001
        print(f"LAX {i} {type(err).__name__}: {str(err)[:200]}", flush=True)
        return
    print(f"OK {i}", flush=True)


def main() -> None:
    for i, line in enumerate(sys.stdin.read().splitlines()):
        print(f"START {i}", flush=True)
        run_case(i, line)


if __name__ == "__main__":
    main()
