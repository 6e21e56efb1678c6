"""The MLX model, read top to bottom; it imports no backend code (the CPU backend's variants of
these classes are pg_edge.cpu's, swapped in at load).

    config.py         PaliGemmaConfig from config.json (config_checks.py: what it accepts)
    siglip.py         the SigLIP vision encoder
    gemma.py          the Gemma / Gemma2 decoder; the axis letters used in every shape
    masks.py          which key a query may see: the prefix-LM rule, the per-window choice, KV caches
    paligemma.py      vision -> connector -> merge with the text -> decoder
    vae.py            the segmentation mask decoder (VQ-VAE)
    variants.py       the official variants' configs and their parameter counts
"""
