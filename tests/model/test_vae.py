"""VQ-VAE mask decoder: MLX vs an independent PyTorch decoder, the converter, the mask step."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from pg_edge.convert.vae import convert_vae
from pg_edge.errors import CheckpointError, PgEdgeError
from pg_edge.tasks.parse import decode_box, DetectedObject
from pg_edge.model.vae import MaskDecoder, add_masks, box_mask, load_mask_decoder
from fixtures.vae import fake_vae_arrays, write_fake_vae

E = 8


class TorchResBlock(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(dim, dim, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(dim, dim, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(dim, dim, 1))

    def forward(self, x):
        return x + self.net(x)


class TorchMaskDecoder(torch.nn.Module):
    """The decoder as a PyTorch Sequential: its state-dict keys ARE the vae-oid.npz keys."""

    def __init__(self, embed_dim):
        super().__init__()
        up = lambda i, o: [torch.nn.ConvTranspose2d(i, o, 4, stride=2, padding=1), torch.nn.ReLU()]
        self.decoder = torch.nn.Sequential(
            torch.nn.Conv2d(embed_dim, 128, 1), torch.nn.ReLU(),
            TorchResBlock(128), TorchResBlock(128),
            *up(128, 128), *up(128, 64), *up(64, 32), *up(32, 16),
            torch.nn.Conv2d(16, 1, 1))

    def forward(self, codes, codebook):
        b = codes.shape[0]
        x = codebook[codes.reshape(-1)].reshape(b, 4, 4, -1).permute(0, 3, 1, 2)  # NCHW
        return self.decoder(x)[:, 0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    arrays = fake_vae_arrays(E, seed=1)
    out = convert_vae(write_fake_vae(d / "vae-oid.npz", arrays), d / "vae.safetensors")
    return arrays, out


def test_decoder_matches_torch(converted):
    arrays, path = converted
    ref = TorchMaskDecoder(E)
    state = {k: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("decoder.")}
    ref.load_state_dict(state, strict=True)  # proves the key layout as well as the values
    codes = np.random.default_rng(2).integers(0, 128, size=(3, 16))
    codes[0, 0], codes[1, 5] = 0, 127  # both ends of the codebook
    with torch.no_grad():
        want = ref(torch.from_numpy(codes), torch.from_numpy(arrays["_vq_vae._embedding"])).numpy()

    got = np.array(load_mask_decoder(path)(mx.array(codes)))
    assert got.shape == want.shape == (3, 64, 64)
    diff = np.abs(got - want).max()
    assert diff <= 1e-4, f"max |mlx - torch| = {diff:.3g}"
    assert np.abs(want).max() > 0.1  # the comparison is not between two near-zero outputs
    assert not np.allclose(got[0], got[1])  # different codes, different masks


def test_conv_transpose_padding_matches_torch():
    # The classic trap: torch padding p trims p from each side of the full output; an
    # asymmetric kernel also catches a missing or extra spatial flip.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 5, 3, 6)).astype(np.float32)  # NHWC, H != W
    w = rng.standard_normal((6, 2, 4, 4)).astype(np.float32)  # torch (in, out, kH, kW)
    want = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(w), stride=2, padding=1)
    got = mx.conv_transpose2d(mx.array(x), mx.array(w.transpose(1, 2, 3, 0)), stride=2, padding=1)
    assert tuple(want.shape) == (1, 2, 10, 6)  # (in - 1) * 2 - 2 + 4 = 2 * in
    assert np.abs(np.array(got).transpose(0, 3, 1, 2) - want.numpy()).max() <= 1e-5


def test_converted_file_keys(converted):
    _, path = converted
    weights, meta = mx.load(str(path), return_metadata=True)
    assert "vq_vae.embedding" in weights and "_vq_vae._embedding" not in weights
    assert not [k for k in weights if k.startswith("encoder")]
    assert weights["decoder.4.weight"].shape == (128, 4, 4, 128)  # (out, kH, kW, in)
    assert weights["decoder.6.weight"].shape == (64, 4, 4, 128)
    assert weights["decoder.0.weight"].shape == (128, 1, 1, E)
    assert meta["embed_dim"] == str(E)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_convert_refuses_to_overwrite_without_force(tmp_path):
    npz = write_fake_vae(tmp_path / "v.npz", embed_dim=4)
    out = convert_vae(npz, tmp_path / "vae.safetensors")
    with pytest.raises(PgEdgeError, match="exists"):
        convert_vae(npz, out)
    assert load_mask_decoder(convert_vae(npz, out, force=True)).embed_dim == 4


@pytest.mark.parametrize("key", ["_vq_vae._embedding", "decoder.0.weight", "decoder.3.net.4.bias",
                                 "decoder.10.weight", "decoder.12.bias"])
def test_convert_names_missing_key(tmp_path, key):
    arrays = fake_vae_arrays(E)
    del arrays[key]
    out = tmp_path / "vae.safetensors"
    with pytest.raises(CheckpointError, match=f"missing key {key.replace('.', '[.]')}"):
        convert_vae(write_fake_vae(tmp_path / "v.npz", arrays), out)
    assert not out.exists()


@pytest.mark.parametrize("key,shape", [("decoder.8.weight", (64, 16, 4, 4)),  # out/in swapped
                                       ("decoder.2.net.0.weight", (128, 128, 1, 1)),
                                       ("_vq_vae._embedding", (64, E))])
def test_convert_names_wrong_shape(tmp_path, key, shape):
    arrays = fake_vae_arrays(E)
    arrays[key] = np.zeros(shape, np.float32)
    with pytest.raises(CheckpointError, match=key.replace(".", "[.]")):
        convert_vae(write_fake_vae(tmp_path / "v.npz", arrays), tmp_path / "vae.safetensors")


def test_convert_ignores_encoder_and_refuses_bad_files(tmp_path):
    arrays = {k: v for k, v in fake_vae_arrays(E).items() if not k.startswith("encoder")}
    convert_vae(write_fake_vae(tmp_path / "v.npz", arrays), tmp_path / "vae.safetensors")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.npz"):
        convert_vae(tmp_path / "junk.npz", tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        convert_vae(tmp_path / "absent.npz", tmp_path / "x.safetensors")
    mx.save_safetensors(str(tmp_path / "plain.safetensors"), {"a": mx.zeros((1,))})
    with pytest.raises(CheckpointError, match="not a pg_edge mask decoder"):
        load_mask_decoder(tmp_path / "plain.safetensors")


def test_decoder_refuses_bad_codes():
    dec = MaskDecoder(E)
    with pytest.raises(PgEdgeError, match="0..127"):
        dec(mx.array([[128] * 16]))
    with pytest.raises(PgEdgeError, match="int\\[B, 16\\]"):
        dec(mx.array([[1] * 15]))


def test_box_mask_fills_the_box_of_a_non_square_image():
    logits = np.ones((64, 64), np.float32)
    logits[:, 32:] = -1.0  # left half of the box inside
    mask = box_mask(logits, (10.7, 20.2, 50.9, 40.0), (80, 60))
    assert mask.shape == (60, 80) and mask.dtype == bool
    ys, xs = np.nonzero(mask)
    assert (ys.min(), ys.max(), xs.min()) == (20, 39, 10)  # int() of the box, as big_vision
    assert 28 <= xs.max() <= 31  # about half of the 40-px wide box
    assert not box_mask(logits, (5.2, 5.0, 5.9, 9.0), (80, 60)).any()  # vanishes after int()


def test_add_masks_batches_segmented_objects(converted):
    _, path = converted
    dec = load_mask_decoder(path)
    size = (90, 50)
    loc = (100, 200, 900, 800)
    seg = tuple(range(16))
    objs = [DetectedObject("cat", decode_box(loc, size), loc, seg),
            DetectedObject("dog", decode_box(loc, size), loc)]
    out = add_masks(objs, dec, size)
    assert out[1] is objs[1] and objs[0].mask is None
    assert out[0].mask.shape == (50, 90)
    logits = np.array(dec(mx.array([seg])))[0]
    np.testing.assert_array_equal(out[0].mask, box_mask(logits, objs[0].box, size))
