"""PaliGemma 1 and 2 in plain NumPy: the project's readable account of the architecture, and
the independent check of the MLX model. It imports no mlx, torch or transformers.

Read in this order:
    layers.py         the numeric pieces (norms, tanh-GELU, RoPE, grouped-head attention)
    siglip.py         the vision encoder
    masks.py          the prefix-LM mask, padding and Gemma2's sliding window
    gemma.py          the Gemma / Gemma2 decoder and its KV cache
    model.py          ReferenceModel: image features, merged embeddings, logits, greedy decoding
    weights.py        weights by checkpoint name, in the compute dtype
    dequant.py        MLX affine-quantized weights back to floats
    safetensors_np.py .safetensors files and checkpoint folders, read by hand

    >>> ref = ReferenceModel.from_folder("converted/paligemma2-3b-mix-224")
    >>> logits = ref.logits(input_ids, pixel_values, mask_ar)     # float32[B, T, V]
"""

from pg_edge.reference.dequant import dequantize, quantization_of, unpack_codes
from pg_edge.reference.model import IMAGE_TOKEN_INDEX, ReferenceModel
from pg_edge.reference.safetensors_np import load_file, read_folder

__all__ = ["ReferenceModel", "IMAGE_TOKEN_INDEX", "dequantize", "quantization_of", "unpack_codes",
           "load_file", "read_folder"]
