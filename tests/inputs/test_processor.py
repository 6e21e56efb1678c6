"""pg_edge's processor against transformers': pixels, prompt token ids, special ids."""
import numpy as np
import pytest

from pg_edge.inputs.processor import Processor, Tokenizer
from pg_edge.inputs.images import preprocess_image

PROMPTS = [
    "caption en",
    "answer en what colour is the cat?",
    "detect cat ; dog",
    "segment the cup on the left",
    "ocr",
    "describe es  two  spaces, digits 12345 and ünïcödé 日本語",
    "answer en where is <loc0123>?",
]


@pytest.mark.parametrize("size", [28, 224])
def test_pixels_equal_transformers_image_processor(size, sample_images_by_name):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    hf = SiglipImageProcessorPil(size={"height": size, "width": size}, resample=3, do_rescale=True,
                                 rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3)
    for name, image in sample_images_by_name.items():
        want = hf(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        got = preprocess_image(image, size)
        assert got.shape == (size, size, 3) and got.dtype == np.float32
        diff = np.abs(got - want).max()
        assert diff <= 1e-5, f"{name}: {diff}"


def test_rgba_is_composited_on_white_not_dropped(sample_images_by_name):
    img = sample_images_by_name["astronaut_rgba"]
    flat = preprocess_image(img.convert("RGB"), 28)  # alpha simply dropped: the wrong answer
    assert np.abs(preprocess_image(img, 28) - flat).max() > 0.1


def test_token_ids_equal_transformers_processor(hf_checkpoint, sample_images):
    from transformers import PaliGemmaProcessor

    folder = hf_checkpoint(version=1)
    hf = PaliGemmaProcessor.from_pretrained(str(folder))
    tok = Tokenizer(folder)
    proc = Processor(tok, image_size=28, num_image_tokens=16)
    for prompt in PROMPTS:
        want = hf(text=prompt, images=sample_images[0], return_tensors="np")["input_ids"][0].tolist()
        got = proc([sample_images[0]], [prompt]).input_ids[0].tolist()
        assert got == want, prompt


def test_special_ids_come_from_the_tokenizer_files(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id) == (2, 1, 0, 257152)
    assert (tok.loc0, tok.seg0, tok.vocab_size) == (256000, 257024, 257152)
    assert tok.encode("<loc0123>") == [256123]
    assert tok.encode("<seg042>") == [257024 + 42]
    assert tok.decode(tok.encode("x <loc0001><loc1023> y")) == "x <loc0001><loc1023> y"


def test_prompt_layout(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    ids = tok.prompt_ids("caption en", 4)
    assert ids[:5] == [257152] * 4 + [2]
    assert ids[5:-1] == tok.encode("caption en")
    assert ids[-1:] == tok.encode("\n")
    assert tok.suffix_ids("a cat")[-1] == 1


def test_batch_is_left_padded(tokenizer_dir, sample_images):
    proc = Processor(Tokenizer(tokenizer_dir), image_size=28, num_image_tokens=16)
    inp = proc(sample_images[:2], ["ocr", "answer en what is in the picture?"])
    short = inp.valid[0]
    assert not short[0] and short[-1] and inp.valid[1].all()
    assert (inp.input_ids[0][~short] == 0).all()
    assert inp.pixel_values.shape == (2, 28, 28, 3)


def test_tokenizer_json_fallback_equals_sentencepiece(hf_checkpoint, tmp_path):
    """Folders written by transformers 5 / recent mlx-vlm carry only tokenizer.json."""
    import shutil

    src = hf_checkpoint(version=1)
    only_json = tmp_path / "json"
    only_json.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, only_json / name)
    sp, tj = Tokenizer(src), Tokenizer(only_json)
    assert type(tj.backend).__name__ == "_TokenizerJson"
    for attr in ("bos_id", "eos_id", "pad_id", "image_id", "loc0", "seg0", "vocab_size", "newline_ids"):
        assert getattr(tj, attr) == getattr(sp, attr), attr
    for prompt in PROMPTS:
        assert tj.prompt_ids(prompt, 4) == sp.prompt_ids(prompt, 4), prompt
        ids = sp.encode(prompt)
        assert tj.decode(ids) == sp.decode(ids)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    from pg_edge.errors import CheckpointError

    with pytest.raises(CheckpointError, match="tokenizer"):
        Tokenizer(tmp_path)
