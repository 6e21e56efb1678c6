"""Model folders on disk: finding, checking, reading and writing them. MLX is imported only where
tensors are read or written (safetensors_check.py stays MLX-free: pg_edge.reference and
pg_edge.inputs read through it).

    folder.py             a model folder: resolve (local, demo or hub id), config, shards, FolderWriter
    hub.py                Hugging Face hub downloads
    safetensors_check.py  a safetensors header checked in Python before any tensor is read; read_json
    safetensors_io.py     positioned reads and streamed writes of safetensors files
    weights.py            checkpoint key names: HF / mlx-vlm / pg_edge layouts -> the model's names
    loader.py             folder -> PaliGemmaModel (sanitize, quantize skeleton, strict load)
    stream_convert.py     converting / quantizing tensor by tensor, memory near one tensor
    atomic.py             files and folders written under a temporary name, renamed when complete
    output_check.py       where a command may write: never over its inputs or a folder not its own
"""
