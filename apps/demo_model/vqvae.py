"""Train the demo's VQ-VAE on the shapes' masks and save it as big_vision's vae-oid.npz layout.

    python -m apps.demo_model.vqvae OUT.npz [--steps N]

Architecture = big_vision's mask VQ-VAE (the decoder pg_edge/model/vae.py runs): a 64x64 box-crop mask
in [-1, 1] -> 4 stride-2 convs (16, 32, 64, 128 channels) -> 2 ResBlocks -> 1x1 conv to E = 8
-> nearest of 128 codebook rows per cell of the 4x4 grid (16 codes) -> the decoder (1x1 conv to
128, 2 ResBlocks, 4 transposed convs 128->128->64->32->16, 1x1 conv to 1) -> logits (> 0 =
inside), regressed onto the +-1 mask. Codebook learning: VQ-VAE's codebook and commitment
losses with a straight-through gradient; unused codes are re-seeded from encoder outputs.

The npz holds torch's state-dict keys and layouts (`encoder.*`, `decoder.*`,
`_vq_vae._embedding`), which `pg-edge convert-vae` reads. `encode(masks)` (the encoder plus
nearest code) gives the pretraining targets. Dev tool: torch, never imported by the runtime.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from PIL import Image

EMBED_DIM = 8
NUM_CODES = 128
MASK = 64


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x):
        return x + self.net(x)


class VQ(nn.Module):
    def __init__(self):
        super().__init__()
        self._embedding = nn.Parameter(torch.randn(NUM_CODES, EMBED_DIM) * 0.5)


class VQVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(),
            ResBlock(128), ResBlock(128), nn.Conv2d(128, EMBED_DIM, 1))
        self._vq_vae = VQ()
        self.decoder = nn.Sequential(
            nn.Conv2d(EMBED_DIM, 128, 1), nn.ReLU(), ResBlock(128), ResBlock(128),
            nn.ConvTranspose2d(128, 128, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(16, 1, 1))

    def quantize(self, z):
        """z float[B, E, 4, 4] -> (codes int[B, 16] row-major, quantized float[B, E, 4, 4])."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
        codes = torch.cdist(flat, self._vq_vae._embedding).argmin(1)
        q = self._vq_vae._embedding[codes].reshape(z.shape[0], 4, 4, EMBED_DIM).permute(0, 3, 1, 2)
        return codes.reshape(z.shape[0], 16), q

    def encode(self, masks):
        """float[B, 64, 64] in [-1, 1] -> int[B, 16]."""
        return self.quantize(self.encoder(masks[:, None]))[0]

    def decode(self, codes):
        """int[B, 16] -> logits float[B, 64, 64]."""
        q = self._vq_vae._embedding[codes].reshape(-1, 4, 4, EMBED_DIM).permute(0, 3, 1, 2)
        return self.decoder(q)[:, 0]


def crop_masks(samples) -> np.ndarray:
    """float32[N, 64, 64] in {-1, 1}: each shape's mask cropped to its box, resized bilinearly."""
    from pg_edge.demo import shapes as S

    out = []
    for s in samples:
        for sh in s.shapes:
            m = S.shape_mask(sh)
            x1, y1, x2, y2 = sh.box
            crop = Image.fromarray((m[y1:y2, x1:x2] * 255).astype(np.uint8))
            out.append(np.asarray(crop.resize((MASK, MASK), Image.BILINEAR)) > 127)
    return np.where(np.stack(out), 1.0, -1.0).astype(np.float32)


def train(steps: int, seed: int = 0, log=print) -> VQVAE:
    from pg_edge.demo import shapes as S

    torch.manual_seed(seed)
    masks = torch.from_numpy(crop_masks(S.split("train", 3000)))
    model = VQVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        x = masks[torch.randint(len(masks), (64,), generator=g)]
        z = model.encoder(x[:, None])
        codes, q = model.quantize(z)
        zq = z + (q - z).detach()  # straight-through
        recon = model.decoder(zq)[:, 0]
        loss = ((recon - x) ** 2).mean() + ((q - z.detach()) ** 2).mean() + 0.25 * ((z - q.detach()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            with torch.no_grad():  # re-seed dead codes from encoder outputs
                used = torch.zeros(NUM_CODES, dtype=torch.bool)
                used[codes.reshape(-1)] = True
                flat = z.permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
                dead = (~used).nonzero()[:, 0]
                if step < steps * 0.7 and len(dead):
                    pick = flat[torch.randint(len(flat), (len(dead),), generator=g)]
                    model._vq_vae._embedding[dead] = pick + 0.01 * torch.randn_like(pick)
            log(f"vqvae step {step} loss {loss.item():.4f} codes used {int(used.sum())} "
                f"({time.perf_counter() - t0:.0f} s)")
    return model


def mask_iou(model: VQVAE, masks: torch.Tensor) -> float:
    with torch.no_grad():
        rec = model.decode(model.encode(masks)) > 0
    gt = masks > 0
    return float(((rec & gt).sum((1, 2)) / (rec | gt).sum((1, 2))).mean())


def save_npz(model: VQVAE, path: Path) -> Path:
    arrays = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def load_npz(path: Path) -> VQVAE:
    model = VQVAE()
    with np.load(path) as data:
        model.load_state_dict({k: torch.from_numpy(data[k]) for k in data.files})
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=600)  # what the shipped decoder had
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = train(a.steps)
    from pg_edge.demo import shapes as S

    iou = mask_iou(model, torch.from_numpy(crop_masks(S.split("valid", 300))))
    save_npz(model, Path(a.out))
    print(f"wrote {a.out}: validation 64x64 mask IoU {iou:.4f}, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
