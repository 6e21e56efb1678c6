"""User input -> model input, no MLX: the NumPy reference and the tools share it.

    images.py      opening images safely (pixel limit, formats, EXIF) and preprocess_image
    tokenizer.py   the SentencePiece tokenizer and the prompt layout (prompt_ids)
    checks.py      prompt text, token counts and sampling settings checked before any compute
    processor.py   images + prompts -> Inputs (token ids, valid mask, pixels), left-padded
"""
