"""Pretrain the demo model from random init in torch with transformers' PaliGemma classes.

    python -m apps.demo_model.pretrain --tokenizer TOK --vae VAE.npz -o HF_OUT [--steps N]

Tasks: caption, detect, segment (NOT counting: that is learned later, by `pg-edge finetune`).
Each step draws fresh images from the train split (the generator is cheap), builds the
PaliGemma sequence `<image> x 49, <bos>, prefix, "\\n", suffix, <eos>` with the ids pg_edge's
Tokenizer gives, lets transformers build the prefix-LM mask from token_type_ids (0 = prefix:
bidirectional; 1 = suffix: causal) and takes next-token cross-entropy on the suffix only,
averaged per example, then over examples.
AdamW, linear warmup then cosine decay, bf16 autocast (AMX on the CPU the pretraining ran on) or
float32 (`--float32`: a CPU without a fast bf16 path). An empty suffix (a detect/segment prompt
naming kinds not in the image) is trained on `<eos>` alone. Writes the official HF
layout with `save_pretrained` plus the tokenizer and preprocessor files, as the hub has them.
Dev tool (torch): the runtime never imports it.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from apps.demo_model import arch
from apps.demo_model.examples import example, parse_shares
from apps.demo_model.vqvae import crop_masks, load_npz
from pg_edge.demo import shapes as S
from pg_edge.inputs.images import preprocess_image
from pg_edge.inputs.tokenizer import Tokenizer

TASK_MIX = (("caption", 0.4), ("detect", 0.3), ("segment", 0.3))
PREPROCESSOR = {
    "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
    "image_seq_length": 49, "processor_class": "PaliGemmaProcessor", "resample": 3,
    "rescale_factor": 1 / 255, "size": {"height": arch.IMAGE_SIZE, "width": arch.IMAGE_SIZE},
}


class Batcher:
    """Fresh training batches: pixel_values float[B, 3, 224, 224], input_ids, attention_mask,
    token_type_ids int[B, T] (right-padded), loss_mask bool[B, T] on the positions whose NEXT
    token is a suffix token."""

    def __init__(self, tokenizer: Tokenizer, vae, seed: int = 0):
        self.tok, self.vae = tokenizer, vae
        self.rng = np.random.default_rng(seed)
        self.next_index = 0
        self.n_image = (arch.IMAGE_SIZE // arch.VISION["patch_size"]) ** 2

    def codes(self, samples) -> dict:
        if isinstance(self.vae, dict):  # a seg_table.py table: codes per (kind, side)
            return {(i, j): self.vae[f"{sh.kind}/{sh.box[2] - sh.box[0]}"]
                    for i, s in enumerate(samples) for j, sh in enumerate(s.shapes)}
        crops = crop_masks(samples)
        with torch.no_grad():
            codes = self.vae.encode(torch.from_numpy(crops)).numpy()
        keys = [(i, j) for i, s in enumerate(samples) for j in range(len(s.shapes))]
        return {k: [int(c) for c in row] for k, row in zip(keys, codes)}

    def __call__(self, batch_size: int, tasks=None, single: float = 0.0, mix=TASK_MIX, forms=None):
        """`single`: the fraction of images drawn with one shape only (a curriculum); `forms`:
        shares of the detect/segment prompt forms (examples.kinds_for; None: pretraining's draw)."""
        base = S.SPLIT_SEEDS["train"] * 1_000_000 + self.next_index
        samples = [S.make_sample(base + i, 1 if single and self.rng.random() < single else None)
                   for i in range(batch_size)]
        self.next_index += batch_size
        codes = self.codes(samples)
        names, probs = zip(*mix)
        rows, types, tasks_out = [], [], []
        for i, s in enumerate(samples):
            task = tasks[i] if tasks else names[self.rng.choice(len(names), p=probs)]
            lookup = {sh: codes[(i, j)] for j, sh in enumerate(s.shapes)}
            prefix, suffix = example(s, task, self.rng, seg_codes=lambda sh: lookup[sh], forms=forms)
            pre = self.tok.prompt_ids(prefix, self.n_image)
            suf = self.tok.suffix_ids(suffix)
            rows.append(pre + suf)
            types.append([0] * len(pre) + [1] * len(suf))
            tasks_out.append(task)
        T = max(len(r) for r in rows)
        ids = np.full((batch_size, T), self.tok.pad_id, np.int64)
        tt = np.ones((batch_size, T), np.int64)
        am = np.zeros((batch_size, T), np.int64)
        for b, (r, t) in enumerate(zip(rows, types)):
            ids[b, :len(r)], tt[b, :len(r)], am[b, :len(r)] = r, t, 1
        loss_mask = np.zeros((batch_size, T), bool)
        loss_mask[:, :-1] = (tt[:, 1:] == 1) & (am[:, 1:] == 1)
        pixels = np.stack([preprocess_image(s.image, arch.IMAGE_SIZE) for s in samples]).transpose(0, 3, 1, 2)
        return (torch.from_numpy(pixels), torch.from_numpy(ids), torch.from_numpy(am), torch.from_numpy(tt),
                torch.from_numpy(loss_mask), tasks_out)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


LOC_SIGMA = 3.0  # bins (1024 bins over 224 px: 4.6 bins a pixel)
LOC_WINDOW = torch.arange(-9, 10)
LOC_WEIGHTS = torch.exp(-LOC_WINDOW.float() ** 2 / (2 * LOC_SIGMA ** 2))
LOC_WEIGHTS = LOC_WEIGHTS / LOC_WEIGHTS.sum()


def loss_fn(model, batch, loc0: int, per_example: bool = True, loc_soft: bool = True, bf16: bool = True,
            decision: float = 0.0):
    """(mean suffix loss, {task: mean token loss of its rows} for the log).

    `<locNNNN>` targets are soft: a Gaussian over the neighbouring bins (sigma LOC_SIGMA), so a
    box one pixel off is nearly right and neighbouring bins learn similar embeddings; every other
    target is plain cross-entropy. `decision` adds that weight times each row's FIRST suffix
    token's loss to the row: with the per-example mean, an empty answer (`<eos>` alone) puts its
    whole weight on "say nothing" while a present kind's first `<loc>` ("say something") gets
    1/length of its row, so the model learned to answer present kinds with nothing."""
    pixels, ids, am, tt, lm, tasks = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, pixel_values=pixels, attention_mask=am, token_type_ids=tt).logits
    logp = torch.log_softmax(logits.float()[:, :-1], -1)
    target = ids[:, 1:]
    is_loc = (target >= loc0) & (target < loc0 + 1024)
    near = (target[..., None] + LOC_WINDOW).clamp(loc0, loc0 + 1023)
    soft = -(logp.gather(-1, near) * LOC_WEIGHTS).sum(-1)
    hard = -logp.gather(-1, target[..., None])[..., 0]
    per_token = torch.where(is_loc, soft, hard) if loc_soft else hard
    mask = lm[:, :-1].float()
    by_task = {}
    with torch.no_grad():
        for t in set(tasks):
            rows = torch.tensor([x == t for x in tasks])
            by_task[t] = float((per_token[rows] * mask[rows]).sum() / mask[rows].sum().clamp(min=1))
    # Mean per example, then over examples (big_vision's default): per token, the long segment
    # rows (~70 tokens) would drown the captions (~12), and the vision tower then learns where
    # shapes are but stops telling colours apart (measured: colour sensitivity fell 6x).
    if not per_example:
        return (per_token * mask).sum() / mask.sum(), by_task
    per_row = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    if decision:
        first = mask.argmax(1)  # the first position whose next token is a suffix token
        per_row = per_row + decision * per_token.gather(1, first[:, None])[:, 0] * mask.any(1)
    return per_row.mean(), by_task


def smooth_loc_embeddings(model, loc0: int, sigma: float) -> None:
    """Gaussian-blur the 1024 `<loc>` embedding rows along the bin axis: neighbouring bins start
    out similar (an ordinal prior), which speeds up learning boxes."""
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        rows = emb[loc0:loc0 + 1024].clone()
        k = torch.arange(-int(3 * sigma), int(3 * sigma) + 1).float()
        w = torch.exp(-k ** 2 / (2 * sigma ** 2))
        padded = torch.nn.functional.pad(rows.T[None], (len(k) // 2, len(k) // 2), mode="replicate")
        blurred = torch.nn.functional.conv1d(padded.transpose(0, 1), (w / w.sum())[None, None])[:, 0].T
        emb[loc0:loc0 + 1024] = blurred * (rows.norm() / blurred.norm())


def sinusoids(coords: torch.Tensor, dim: int, max_period: float = 448.0, min_period: float = 4.0) -> torch.Tensor:
    """float[N] pixel coordinates -> float[N, dim]: sin/cos at dim/2 geometric periods."""
    periods = max_period * (min_period / max_period) ** torch.linspace(0, 1, dim // 2)
    angle = 2 * math.pi * coords[:, None] / periods[None]
    return torch.cat([angle.sin(), angle.cos()], 1)


def add_position_priors(model, loc0: int, scale: float) -> None:
    """Add a 2D sinusoidal code of each patch's centre to SigLIP's position embeddings, and the
    1D code of each bin's coordinate to the `<loc>` embeddings (tied to the head): both sides
    of "where" then start in one coordinate system. `scale`: relative to each table's norm."""
    with torch.no_grad():
        pos = model.model.vision_tower.embeddings.position_embedding.weight
        n, width = pos.shape
        side = int(round(n ** 0.5))
        patch = arch.IMAGE_SIZE / side
        centre = (torch.arange(side).float() + 0.5) * patch
        yy, xx = torch.meshgrid(centre, centre, indexing="ij")
        code = torch.cat([sinusoids(yy.reshape(-1), width // 2), sinusoids(xx.reshape(-1), width // 2)], 1)
        pos += scale * code * (pos.norm() / code.norm())
        emb = model.get_input_embeddings().weight
        rows = emb[loc0:loc0 + 1024]
        code = sinusoids(torch.arange(1024).float() / 1023 * arch.IMAGE_SIZE, rows.shape[1])
        emb[loc0:loc0 + 1024] = rows + scale * code * (rows.norm() / code.norm())


def save_hf(model, tokenizer_dir: Path, out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in Path(tokenizer_dir).iterdir():  # the tokenizer files; never the weights or config
        if f.is_file() and f.suffix != ".safetensors" and not (tmp / f.name).exists():
            shutil.copy(f, tmp / f.name)
    (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--vae", required=True,
                   help="vae-oid.npz with its encoder (apps.demo_model.vqvae), or a JSON code table "
                        "(apps.demo_model.seg_table) that gives the segment targets instead")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=150)
    # One thread: with other jobs on the machine, two threads ran 10x slower per step here.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--init", default=None, help="continue from this HF folder instead of random init")
    p.add_argument("--single", type=float, default=0.5,
                   help="fraction of one-shape images, decaying linearly to 0 over the first half")
    p.add_argument("--loss-norm", choices=("example", "token"), default="example",
                   help="mean per example then over examples, or over all suffix tokens")
    p.add_argument("--hard-loc", dest="loc_soft", action="store_false",
                   help="plain cross-entropy on <loc> targets too (default: Gaussian soft targets)")
    p.add_argument("--mix", default="caption=0.4,detect=0.3,segment=0.3", help="task shares")
    p.add_argument("--stop-at", type=int, default=None, help="end at this step (the schedule keeps --steps)")
    p.add_argument("--smooth-loc", type=float, default=8.0,
                   help="blur the <loc> embeddings along the bin axis with this sigma (bins) at the start")
    p.add_argument("--position-priors", type=float, default=0.0,
                   help="add sinusoidal position codes (this fraction of the tables' norm) at the start")
    p.add_argument("--start-index", type=int, default=0, help="first train-split image to draw")
    p.add_argument("--prompts", default=None,
                   help='detect/segment prompt forms, e.g. "single=0.35,pair=0.2,all=0.25,absent=0.2" '
                        "(examples.kinds_for; default: pretraining's draw)")
    p.add_argument("--float32", action="store_true", help="no bf16 autocast")
    p.add_argument("--decision", type=float, default=0.0,
                   help="extra weight on each row's first suffix token (loss_fn): 1 puts an answer's "
                        "'say something' on par with an empty answer's 'say nothing'")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from transformers import PaliGemmaForConditionalGeneration

    tok = Tokenizer(a.tokenizer)
    cfg = arch.hf_config(tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
    if a.init:
        model = PaliGemmaForConditionalGeneration.from_pretrained(a.init, dtype=torch.float32)
    else:
        model = PaliGemmaForConditionalGeneration(cfg)
    model.config._attn_implementation = "eager"
    if a.smooth_loc:
        smooth_loc_embeddings(model, tok.loc0, a.smooth_loc)
    if a.position_priors:
        add_position_priors(model, tok.loc0, a.position_priors)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}", flush=True)
    vae = json.loads(Path(a.vae).read_text()) if a.vae.endswith(".json") else load_npz(Path(a.vae))
    batcher = Batcher(tok, vae, a.seed)
    batcher.next_index = a.start_index
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.98))
    t0 = time.perf_counter()
    model.train()
    ema = None
    mix = tuple((k, float(v)) for k, v in (kv.split("=") for kv in a.mix.split(",")))
    forms = parse_shares(a.prompts) if a.prompts else None
    end = min(a.stop_at or a.steps, a.steps)
    for step in range(end):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
        batch = batcher(a.batch_size, single=a.single * max(0.0, 1 - 2 * step / a.steps), mix=mix,
                        forms=forms)
        loss, by_task = loss_fn(model, batch, tok.loc0, a.loss_norm == "example", a.loc_soft, not a.float32,
                                a.decision)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 25 == 0 or step == end - 1:
            print(f"step {step} loss {loss.item():.4f} ema {ema:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  + " ".join(f"{k} {v:.3f}" for k, v in sorted(by_task.items()))
                  + f" {time.perf_counter() - t0:.0f} s", flush=True)
        if (step + 1) % a.save_every == 0 or step == end - 1:
            save_hf(model, Path(a.tokenizer), Path(a.output))
    print(f"pretrained {end} steps in {time.perf_counter() - t0:.0f} s -> {a.output}", flush=True)


if __name__ == "__main__":
    main()
