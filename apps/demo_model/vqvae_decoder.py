"""Keep only what decoding needs from a trained vae-oid.npz: the codebook and `decoder.*`.

    python -m apps.demo_model.vqvae_decoder FULL.npz OUT.npz

The result is still big_vision's vae-oid.npz layout (same keys, same torch layouts) minus the
encoder, which only makes training targets; `pg-edge convert-vae` reads it.
"""
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    with np.load(src) as data:
        keep = {k: data[k] for k in data.files if k.startswith("decoder.") or k == "_vq_vae._embedding"}
    np.savez(out, **keep)
    print(f"wrote {out}: {len(keep)} arrays")


if __name__ == "__main__":
    main()
