"""The hostile model folders the hardening issue lists, one by one, through `pg-edge run`: each
is refused with one line naming the file or the field, before MLX's native loader sees it."""
import json
import shutil

import pytest
from PIL import Image

from pg_edge.cli import main
from fuzz_cases import _join, _split


def biggest_shard(folder):
    """The shard with the most tensors (some fixture shards hold only one)."""
    return max(sorted(folder.glob("model-*.safetensors")), key=lambda f: len(_split(f.read_bytes())[0]))


def edit_header(shard, change):
    header, body = _split(shard.read_bytes())
    change(header)
    shard.write_bytes(_join(json.dumps(header), body))


def first_two(header):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]


def overlap(header):
    """The second tensor reads the first one's bytes (same length kept: only the overlap is wrong)."""
    a, b = first_two(header)
    (a0, _), (b0, b1) = header[a]["data_offsets"], header[b]["data_offsets"]
    header[b]["data_offsets"] = [a0, a0 + b1 - b0]


def big_dim(header):
    a, _ = first_two(header)
    header[a]["shape"] = [2**32 + header[a]["shape"][0]] + header[a]["shape"][1:]  # wraps in int32


def set_index(value):
    def change(folder):
        p = folder / "model.safetensors.index.json"
        index = json.loads(p.read_text())
        key = sorted(index["weight_map"])[0]
        index["weight_map"][key] = value
        p.write_text(json.dumps(index))
    return change


def set_config(path, value):
    def change(folder):
        cfg = json.loads((folder / "config.json").read_text())
        node = cfg
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        (folder / "config.json").write_text(json.dumps(cfg))
    return change


def write(name, text):
    return lambda folder: (folder / name).write_text(text)


CASES = {
    "overlapping offsets": (lambda f: edit_header(biggest_shard(f), overlap), ["-of-00006.safetensors", "overlaps"]),
    "dimension past 2^32": (lambda f: edit_header(biggest_shard(f), big_dim), ["-of-00006.safetensors", "2^31"]),
    "shard ../../x": (set_index("../../x.safetensors"), ["outside the model folder"]),
    "absolute shard": (set_index("/etc/passwd"), ["outside the model folder"]),
    "zero heads": (set_config(("text_config", "num_attention_heads"), 0), ["text_config.num_attention_heads"]),
    "zero patch size": (set_config(("vision_config", "patch_size"), 0), ["vision_config.patch_size"]),
    "string for a number": (set_config(("text_config", "hidden_size"), "48"), ["text_config.hidden_size", "integer"]),
    "unknown activation": (set_config(("vision_config", "hidden_act"), "swish"), ["vision_config.hidden_act", "swish"]),
    "non-JSON index": (write("model.safetensors.index.json", "{oops"), ["model.safetensors.index.json", "JSON"]),
    "non-JSON tokenizer_config": (write("tokenizer_config.json", "{oops"), ["tokenizer_config.json", "JSON"]),
    "image_token_index disagrees": (set_config(("image_token_index",), 257100), ["image_token_index 257100", "257152"]),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_model_folder_is_one_line(case, converted, tmp_path, capsys):
    folder = shutil.copytree(converted(version=1), tmp_path / "m")
    if case == "non-JSON tokenizer_config":
        (folder / "added_tokens.json").unlink()  # so the <image> id is looked up in tokenizer_config.json
    change, words = CASES[case]
    change(folder)
    img = tmp_path / "i.png"
    Image.new("RGB", (8, 8)).save(img)
    code = main(["run", str(folder), "--image", str(img), "--prompt", "caption en", "--max-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    for w in words:
        assert w in err[0], err[0]
