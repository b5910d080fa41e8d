"""Narrow-range data (fit.OutputGain): fitted as the same picture at full range, folded exactly into the file."""

import dataclasses

import numpy as np
import pytest
from conftest import photo
from PIL import Image

from pillow_nif import bitstream, fit
from pillow_nif.batch import encode_batch
from pillow_nif.colour import to_network_space
from pillow_nif.fit import EFFORTS, FitConfig, Fitter, OutputGain, choose_architecture, encode_image
from pillow_nif.render import decode_array


def network_space(values, peak=65535):
    """(H, W) or (H, W, C) pixel values -> the network's targets, as the encoder makes them (no colour transform)."""
    v = np.asarray(values, dtype=np.float64)
    return to_network_space((v if v.ndim == 3 else v[..., None]) / peak, 0)


def own_range_psnr(data, values, peak):
    out = decode_array(data, device="cpu").astype(np.float64).reshape(np.shape(values))
    return 10 * np.log10(peak**2 / np.mean((out - values) ** 2))


def test_the_gain_is_the_power_of_two_that_spans_most_of_the_range():
    cfg = FitConfig()
    # 12-bit values in I;16: 16x, where 16-bit values of the same picture would be (the window at the bottom).
    t = network_space([[3, 4000]])
    g = OutputGain.of(t, cfg)
    assert g.gain == 16 and np.allclose(g.normalise(t).ravel(), 2 * np.array([3, 4000]) * 16 / 65535 - 1)
    # 8-bit values in I;16 (Image.convert("I;16") of L): the L image's targets, to 1/256 of them.
    t = network_space([[0, 255]])
    assert OutputGain.of(t, cfg).gain == 256
    assert np.allclose(OutputGain.of(t, cfg).normalise(t).ravel(), [-1, 2 * 255 * 256 / 65535 - 1])
    # Values no such window holds (10-bit ones straddling one at 30000) are centred on their mid-range.
    t = network_space([[30000, 31023]])
    g = OutputGain.of(t, cfg)
    assert g.gain == 64 and np.allclose(g.normalise(t).ravel(), [-64 * 1023 / 65535, 64 * 1023 / 65535])
    for values in ([[0, 65535]], [[100, 40000]], [[7, 7]]):  # full range, over half of it, one value: as they are
        t = network_space(values)
        assert OutputGain.of(t, cfg).gain == 1 and OutputGain.of(t, cfg).normalise(t) is t
    # The widest channel decides: one at full range keeps the gain at 1 for all.
    t = network_space(np.array([[[0, 10, 10], [65535, 20, 20]]]))
    assert OutputGain.of(t, cfg).gain == 1
    # At most 2^output_gain_octaves; 0: never.
    t = network_space([[1000, 1001]])
    assert OutputGain.of(t, cfg).gain == 2.0**cfg.output_gain_octaves
    assert OutputGain.of(t, dataclasses.replace(cfg, output_gain_octaves=0)).gain == 1


@pytest.mark.parametrize("channels", [1, 3])
def test_shifting_the_output_keeps_the_fits_error(channels):
    """After the fit the centre goes into the output bias and the target; a grey image's channel-major target is
    a view of the target, and had been shifted twice (files 2 dB under their fits)."""
    import torch

    cfg = FitConfig()
    target = np.random.default_rng(0).uniform(-1, 1, (16, 24, channels))
    f = Fitter(target, choose_architecture(24, 16, channels, 1500, cfg), "cpu", EFFORTS[1], cfg, 0)
    grid = range(16), range(24)
    loss, mse = f.loss(*grid).item(), f.mse()  # loss builds the channel-major target
    offsets = np.linspace(-5, 3, channels)
    bias = f.model.genesis[-1].bias.detach().clone()
    f.shift_output(offsets)
    assert torch.allclose(f.model.genesis[-1].bias, bias + torch.tensor(offsets, dtype=torch.float32))
    assert torch.allclose(f.target, torch.from_numpy(target + offsets).float())
    assert f.loss(*grid).item() == pytest.approx(loss, rel=1e-4) and f.mse() == pytest.approx(mse, rel=1e-4)


def test_the_file_stores_the_output_layer_at_its_steps_over_the_gain():
    data = encode_image(photo(24, 16, "L"), bpp=6, effort=1).data
    scaled = fit.scale_output_steps(data, 16.0)
    a, b = bitstream.loads(data), bitstream.loads(scaled)
    out = 2 * len(a.header.arch.widths)
    assert len(scaled) == len(data) and b.stream == a.stream and b.header == a.header
    assert [c.step for c in b.codings] == [c.step / 16 if i in (out, out + 1) else c.step
                                           for i, c in enumerate(a.codings)]
    assert fit.scale_output_steps(data, 1.0) is data


@pytest.mark.parametrize("how, within", [("L as I;16", 1.0), ("12-bit", 1.0), ("10-bit, offset", 2.5)])
def test_narrow_range_16_bit_grey_fits_as_well_as_full_range(how, within, one_thread):
    """8-bit values in I;16 (what Image.convert("I;16") makes of L) came out 12-15 dB under the L image here, 12-bit
    data 2.7 dB under the same picture at full range, 10-bit data at an offset 5.8 dB (16 and 12 dB at effort 5 on
    a 256x256 crop at 1.0 bpp). Centred (no window holds the offset data) a fit at effort 1 is a little worse. Means
    over three seeds: one tiny fit at effort 1 varies by 2 dB with its seed."""
    grey = np.asarray(photo(64, 48, "L"), dtype=np.int64)
    values, peak = {"L as I;16": (grey, 255), "12-bit": (grey * 16 + 3, 4095),
                    "10-bit, offset": (grey * 4 + 30000, 1023)}[how]
    narrow, full = [], []
    for seed in range(3):
        r = encode_image(Image.fromarray(values.astype(np.uint16)), bpp=2.0, effort=1, seed=seed)
        assert bitstream.loads(r.data).header.mode == "I;16" and r.bpp <= 2.0
        narrow.append(own_range_psnr(r.data, values, peak))
        assert abs(narrow[-1] - (r.psnr - 20 * np.log10(65535 / peak))) < 1e-6
        assert abs(r.fit_psnr - r.psnr) < 3  # the fit's pixels rendered at its gain
        full.append(own_range_psnr(encode_image(photo(64, 48, "L"), bpp=2.0, effort=1, seed=seed).data, grey, 255))
    assert np.mean(narrow) > np.mean(full) - within


def test_a_dark_grey_picture_in_rgb_keeps_its_chroma_at_zero(one_thread):
    """A grey picture's chroma (YCbCr) is 0.5 exactly: the gain's window once put it at an edge, -1, which the
    network then had to draw, and the decoded channels disagreed by 0.35-0.9 levels on the mean."""
    grey = np.asarray(photo(48, 32, "L"), dtype=np.float64)
    im = Image.fromarray(np.repeat(np.round(grey / 4).astype(np.uint8)[..., None], 3, axis=2))
    assert OutputGain.of(to_network_space(np.asarray(im) / 255, 1), FitConfig()).gain == 4
    out = decode_array(encode_image(im, bpp=3.0, effort=1).data, device="cpu").astype(np.int64)
    assert np.mean(out.max(axis=2) - out.min(axis=2)) < 0.1


def test_tiles_of_narrow_range_data_fit_at_their_gains(one_thread):
    """Tiles are fitted as a batch, each at its own gain; 8-bit values in I;16 had also been ranked for their rates
    by noise (tiles.tile_rates). Before: 10.6 dB under the same picture in L, tiled alike; with the gain alone 2.9."""
    grey = np.asarray(photo(64, 48, "L"), dtype=np.int64)
    cfg = FitConfig(tile_pixels=32 * 24)
    full = own_range_psnr(encode_image(photo(64, 48, "L"), bpp=4.0, effort=1, config=cfg).data, grey, 255)
    for values, peak in ((grey, 255), (grey * 16 + 3, 4095)):
        r = encode_image(Image.fromarray(values.astype(np.uint16)), bpp=4.0, effort=1, config=cfg)
        assert r.tiles == (2, 2) and r.bpp <= 4.0
        assert own_range_psnr(r.data, values, peak) > full - 1.5


def test_a_batch_of_narrow_range_images_fits_each_at_its_own_gain(one_thread):
    grey = np.asarray(photo(64, 48, "L"), dtype=np.int64)
    values = [grey, grey * 16 + 3, grey * 4 + 30000]  # gains 256, 16, 64 (centred), one stack
    results = encode_batch([Image.fromarray(v.astype(np.uint16)) for v in values], bpp=2.0, effort=1)
    full = own_range_psnr(encode_image(photo(64, 48, "L"), bpp=2.0, effort=1).data, grey, 255)
    for v, peak, r in zip(values, (255, 4095, 1023), results):
        assert own_range_psnr(r.data, v, peak) > full - 3.0
        assert abs(own_range_psnr(r.data, v, peak) - (r.psnr - 20 * np.log10(65535 / peak))) < 1e-6
