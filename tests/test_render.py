import io

import numpy as np
import pytest

from conftest import photo

import pillow_nif
from pillow_nif import bitstream
from pillow_nif.render import check_size, decode_array, load_network, pick_backend, render, resample


def test_decode_any_size(small_nif):
    data = small_nif.read_bytes()
    for size in [(1, 1), (97, 61), (200, 30), (13, 128)]:
        im = pillow_nif.decode(data, size=size)
        assert im.size == size and im.mode == "RGB"


def test_stored_size_is_default_and_rendering_is_repeatable(small_nif):
    a = decode_array(small_nif)
    assert a.shape == (61, 97, 3) and a.dtype == np.uint8
    assert np.array_equal(a, decode_array(small_nif.read_bytes(), device="cpu", backend="torch"))


def test_upscaled_decode_matches_stored_pixels_at_the_same_centres(small_nif):
    # At 3x, every third pixel (offset 1) sits at the centre of a stored pixel. This file (2.2 kB) has a post-filter,
    # which belongs to the stored size: the upscaled decode is the network's, as the stored one is before its filter.
    f = bitstream.loads(small_nif.read_bytes())
    assert f.header.arch.filter_taps
    net = load_network(f)
    net.filter = None
    a = render(net, 97, 61).astype(int)
    b = decode_array(small_nif, size=(97 * 3, 61 * 3)).astype(int)
    assert np.abs(b[1::3, 1::3] - a).max() <= 1
    # and the filter brings the stored size closer to the image the file was made from
    ref = np.asarray(photo(97, 61), dtype=float)
    mse = lambda x: np.mean((x - ref) ** 2)  # noqa: E731
    assert mse(decode_array(small_nif)) < mse(a)


def test_a_smaller_decode_is_the_stored_image_resized_not_aliased():
    """Stripes 4 pixels a period, decoded at a quarter of their size: each output pixel covers one period, so the
    picture is their mean. Point samples of the network (the decoder until session 74) all fell on the stripes'
    bright half: a white image instead of a grey one (NOTES.md #219)."""
    from PIL import Image

    stripes = np.tile(np.array([0, 255, 255, 0], np.uint8), (64, 16))
    data = pillow_nif.encode(Image.fromarray(stripes).convert("RGB"), bpp=4, effort=1)
    assert np.abs(decode_array(data).astype(int) - stripes[..., None]).mean() < 8  # the file has the stripes
    small = decode_array(data, size=(16, 16)).astype(float)
    assert abs(small.mean() - 127.5) < 8 and small.std() < 8
    thumb = pillow_nif.decode(data)
    thumb.thumbnail((16, 16))  # the plugin's thumbnail() the same way
    with Image.open(io.BytesIO(data)) as im:
        im.thumbnail((16, 16))
        assert np.array_equal(np.asarray(im), np.asarray(thumb))
    # smaller on one axis only: that axis from the stored samples, the other the network's own at the new size
    wide = decode_array(data, size=(16, 128))
    assert np.array_equal(wide, resample(decode_array(data, size=(64, 128)), (16, 128)))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "I;16"])
def test_a_smaller_decode_is_what_image_resize_gives(mode):
    """Every mode through the same resampling as Image.resize (bicubic; colours weighted by their alpha)."""
    from PIL import Image

    im = photo(40, 30, "RGB")
    if mode in ("LA", "RGBA"):
        a = np.asarray(photo(40, 30, "L"))[::-1]  # an alpha that varies, unlike the colours
        im = Image.fromarray(np.dstack([np.asarray(im.convert(mode[0] if mode == "LA" else "RGB")), a]))
    elif mode == "I;16":
        im = Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257)
    else:
        im = im.convert(mode)
    data = pillow_nif.encode(im, bpp=8, effort=1)
    full = pillow_nif.decode(data)
    assert full.mode == mode
    small = pillow_nif.decode(data, size=(15, 11))
    want = np.asarray(full.resize((15, 11), Image.Resampling.BICUBIC), dtype=np.int64)
    assert small.mode == mode and np.abs(np.asarray(small, dtype=np.int64) - want).max() <= (1 if mode == "I;16" else 0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        check_size((0, 10))
    with pytest.raises(ValueError):
        check_size("big")
    with pytest.raises(ValueError):
        pick_backend("opencl", "cpu")
    with pytest.raises(ValueError, match="device"):
        pillow_nif.decode(b"", device="quantum")
    for size in ("55", (True, True), (10.0, 5), (3,), 7):  # "55" was decoded at 5x5, (True, True) at 1x1
        with pytest.raises(ValueError, match="pair of integers"):
            check_size(size)
    assert check_size((np.int64(7), 5)) == (7, 5)
    with pytest.raises(ValueError, match="device"):
        pillow_nif.decode(b"", device=None)
    for bad in (dict(device="gpu"), dict(backend="opencl")):  # refused here, not at every later load()
        with pytest.raises(ValueError):
            pillow_nif.register(**bad)


def test_a_triton_decoder_that_fails_falls_back_to_torch_under_auto(small_nif, monkeypatch):
    """The kernels compile at their first launch: a GPU older than the installed Triton supports, or no ptxas, must
    not make every Image.open(...).load() fail when the user asked for nothing in particular."""
    from PIL import Image

    from pillow_nif import render as render_module
    from pillow_nif.kernels import nif_decode

    expected = decode_array(small_nif, backend="torch")
    launches = []

    def broken(*args, **kwargs):
        launches.append(1)
        raise RuntimeError("PTX assembly failed")

    # As on a CUDA machine: auto picks the kernels until they fail once.
    monkeypatch.setattr(render_module, "_triton_failed", False)
    monkeypatch.setattr(render_module, "pick_backend", lambda backend, device: "torch" if backend == "torch" or (
        backend == "auto" and render_module._triton_failed) else "triton")
    monkeypatch.setattr(nif_decode, "render_band", broken)
    with pytest.warns(RuntimeWarning, match="Triton decoder failed"):
        assert np.array_equal(decode_array(small_nif), expected)
    assert len(launches) == 1
    with Image.open(small_nif) as im:  # later decodes take torch at once
        assert np.array_equal(np.asarray(im), expected)
    assert len(launches) == 1
    with pytest.raises(RuntimeError, match="PTX"):  # asked for by name: the error is the user's to see
        decode_array(small_nif, backend="triton")


def test_bomb_check(small_nif, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        pillow_nif.decode(small_nif.read_bytes(), size=(3000, 3000))
    with pytest.raises(Image.DecompressionBombError):  # a smaller size renders the stored one first
        pillow_nif.decode(small_nif.read_bytes(), size=(10, 6))
    with pytest.raises(Image.DecompressionBombError):
        Image.open(small_nif)


def test_decoding_and_encoding_make_their_cuda_device_the_current_one(small_nif, monkeypatch):
    """Triton launches its kernels, and CUDA graphs capture, on CUDA's current device, not on their tensors': a
    decode with device="cuda:1" had launched on GPU 0 with GPU 1's pointers. (No GPU here: the context and its
    wiring are what is checked.)"""
    import contextlib

    import torch

    from pillow_nif import batch, fit
    from pillow_nif import render as render_mod

    ctx = render_mod.on_device("cuda:1")
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert all(isinstance(render_mod.on_device(d), contextlib.nullcontext) for d in ("cpu", "cuda"))
    seen = []

    def spy(device):
        seen.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(render_mod, "on_device", spy)
    monkeypatch.setattr(fit, "on_device", spy)
    # the check of a small network against the image's mean colour renders both on the CPU whatever the encode's
    # device (fit.no_worse_than_flat): its own on_device("cpu") is not the wiring under test
    monkeypatch.setattr(fit, "no_worse_than_flat", lambda data, *a: (data, None, a[-1]))
    pillow_nif.decode(small_nif, device="cpu")
    fit.encode_image(photo(24, 16), bpp=8, effort=1, device="cpu", measure=False)
    batch.encode_batch([photo(24, 16)], bpp=8, effort=1, device="cpu", measure=False)
    assert seen == ["cpu"] * 3
