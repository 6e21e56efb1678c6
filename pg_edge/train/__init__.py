"""Fine-tuning PaliGemma as the paper recommends: task prefixes, prefix-LM attention, loss on
the suffix only, and a choice of what trains.

    data.py        (image, prefix, suffix) examples from JSONL or a folder, checked up front;
                   right-padded batches with mask_ar / valid / loss masks
    loss.py        next-token cross-entropy on suffix tokens, per-example or per-token mean
    (pg_edge/adapters.py: the modes, attn (big_vision's recipe) / lora (QLoRA on a quantized
                   base) / full, with or without a frozen SigLIP; the runtime applies saved ones)
    trainer.py     SGD / AdamW, warmup + cosine, accumulation, clipping, data parallelism
    evaluate.py    validation loss, exact match / box IoU of greedy outputs
    checkpoint.py  atomic checkpoints and exact resume
    export.py      adapters, or a fused converted folder
    (`pg-edge finetune` is pg_edge.cli.commands.finetune, apps/cli/commands/finetune.py)

    from pg_edge.checkpoint.loader import load_model
    from pg_edge.inputs.tokenizer import Tokenizer
    from pg_edge.train import ModeSpec, TrainConfig, Trainer, load_dataset

    model, config, folder = load_model("pg2-3b-224")
    data = load_dataset("train.jsonl", Tokenizer(folder), config.vision.image_size,
                        config.num_image_tokens)
    trainer = Trainer(model, ModeSpec("attn"), TrainConfig.for_mode("attn", steps=64), data)
    trainer.fit()
"""
from ..adapters import LoraSettings, ModeSpec, apply_mode, trainable_names
from .data import Batch, DataError, Dataset, Example, load_dataset, read_examples
from .loss import suffix_loss, token_nll
from .trainer import TrainConfig, Trainer

__all__ = [
    "Batch", "DataError", "Dataset", "Example", "load_dataset", "read_examples", "suffix_loss",
    "token_nll", "LoraSettings", "ModeSpec", "apply_mode", "trainable_names", "TrainConfig", "Trainer",
]
