"""quality: a bpp set by the image's content, as a JPEG's quality sets its size (quality.py)."""

import numpy as np
import pytest
from conftest import photo
from PIL import Image

import pillow_nif
from pillow_nif import quality
from pillow_nif.fit import FitConfig, quality_bpp


def asked(im, q, metadata=None):
    return quality_bpp(im, q, metadata or {}, "auto", FitConfig())


def textures(size):
    """A smooth image and a busy one of the same size (the same photo, and noise over it)."""
    smooth = photo(size, size)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 40, (size, size, 3))
    busy = Image.fromarray(np.clip(np.asarray(smooth) + noise, 0, 255).astype(np.uint8))
    return smooth, busy


def test_a_busier_image_gets_more_bits_at_the_same_quality():
    """quality had been a fixed bpp (50 -> 0.31 for every image): a photo of sky and one of foliage came out 12 dB
    apart at one quality, where a JPEG's quality keeps them level and lets the size follow the content."""
    smooth, busy = textures(128)
    for q in (20, 50, 80):
        assert asked(busy, q) > 1.5 * asked(smooth, q)
    # more bits as the quality rises, for each
    for im in (smooth, busy):
        bpps = [asked(im, q) for q in (5, 25, 50, 75, 95)]
        assert bpps == sorted(bpps) and bpps[0] < bpps[-1]


def test_quality_files_follow_their_content_and_keep_within_what_was_asked():
    smooth, busy = textures(48)
    files = pillow_nif.encode_many([smooth, busy], quality=60, effort=1)
    for im, data in zip((smooth, busy), files):
        assert 0.8 * asked(im, 60) <= len(data) * 8 / (48 * 48) <= asked(im, 60)
    assert len(files[1]) > 1.4 * len(files[0])  # the header's bytes are a share of both
    single = pillow_nif.encode(busy, quality=60, effort=1)  # one at a time: the same budget
    assert 0.8 * asked(busy, 60) <= len(single) * 8 / (48 * 48) <= asked(busy, 60)


def test_quality_never_asks_for_less_than_a_file_needs():
    """Under bpp, too small a budget is an error that names the least bpp; under quality there is no bpp to fix, so
    quality asks for at least what the file needs: a tiny image at quality 1, with metadata, and one colour."""
    tiny = photo(8, 6)
    meta = {"icc_profile": bytes(range(256)) * 4}
    data = pillow_nif.encode(tiny, quality=1, effort=1, **meta)
    decoded = pillow_nif.decode(data)
    assert decoded.size == (8, 6) and decoded.info["icc_profile"] == meta["icc_profile"]
    flat = Image.new("RGB", (64, 64), (10, 20, 30))
    assert len(pillow_nif.encode(flat, quality=1)) < 100


def test_quality_of_a_large_image_covers_its_tiles():
    """Over 768x768 pixels an image is tiles, each a file with its own header: quality's bpp covers them all."""
    im = Image.new("RGB", (1200, 600), (200, 200, 200))
    im.paste(photo(600, 300), (300, 150))
    cfg = FitConfig()
    bpp = quality_bpp(im, 1, {}, "auto", cfg)
    from pillow_nif import tiles

    grid, bpps, budget, _ = tiles.plan_tiles(im, bpp, {}, "auto", cfg, 1)
    assert (grid.columns, grid.rows) == (2, 1) and budget == int(bpp * 1200 * 600 // 8)


def test_the_jpeg_measure_counts_each_plane_and_no_headers():
    im = photo(64, 48)
    rgba = im.convert("RGBA")
    alpha = np.zeros((48, 64), np.uint8)
    alpha[8:40, 8:56] = 255
    rgba.putalpha(Image.fromarray(alpha))
    assert quality.jpeg_bits(quality.planes(rgba), 50) > quality.jpeg_bits(quality.planes(im), 50)
    [colours, a] = quality.planes(rgba)
    assert colours.mode == "RGB" and a.mode == "L"
    assert quality.jpeg_bits([colours, a], 50) == quality.jpeg_bits([colours], 50) + quality.jpeg_bits([a], 50)
    # entropy-coded bits alone: a 1x1 image's JPEG is ~600 bytes of headers and a few bytes of scan
    assert quality.jpeg_bits([Image.new("L", (1, 1))], 50) < 64
    # a grey image asks for more than the law for colour gives (quality.GREY_GAIN), the same grey as RGB for about it
    grey = im.convert("L")
    bits = quality.jpeg_bits([grey], 50) / (64 * 48)
    assert quality.payload_bpp(grey, 50) >= 2 ** -0.125 * quality.GREY_GAIN * quality.GAIN * bits**quality.POWER
    # 16-bit grey by its 8 highest bits in use: full-range data as its high bytes, 8-bit data in I;16 as it is
    grey = np.asarray(im.convert("L"), dtype=np.uint16)
    for deep in (Image.fromarray(grey * 257), Image.fromarray(grey).convert("I;16")):
        assert quality.planes(deep)[0].mode == "L"
        assert quality.jpeg_bits(quality.planes(deep), 50) == quality.jpeg_bits([im.convert("L")], 50)


def test_the_jpeg_measure_takes_images_past_jpegs_size_limit():
    """A JPEG side is at most 65 500 pixels; NIF's may be larger, so the measure codes blocks."""
    long = Image.fromarray(np.random.default_rng(1).integers(0, 256, (2, 70000), dtype=np.uint8))
    assert quality.jpeg_bits([long], 50) > 0
    assert quality.payload_bpp(long, 50) <= quality.MAX_BPP


@pytest.mark.parametrize("q", [1, 37.4, 100])
def test_quality_bpp_is_at_a_quarter_octave_level(q):
    b = quality.payload_bpp(photo(64, 64), q)
    assert b == quality.max_bpp(64, 64) or abs(4 * np.log2(b) - round(4 * np.log2(b))) < 1e-9


def test_quality_takes_any_image_pillow_opens():
    """An image's info goes with it to Pillow's JPEG writer, which refused a GIF's comment over 64 KB; an empty image
    had raised ZeroDivisionError instead of the error bpp gives."""
    im = photo(32, 24).convert("P")
    im.info["comment"] = b"x" * 70000
    assert asked(im, 50) > 0
    with pytest.raises(ValueError, match="cannot write empty image"):
        pillow_nif.encode(Image.new("RGB", (0, 5)), quality=50)


@pytest.mark.parametrize("size", [(61, 47), (100, 70)])
def test_quality_covers_every_tile_of_small_tiles(size):
    """Each tile's share of the bytes must hold its own header: with tiles of 48x32 pixels, quality 1 had asked for
    the largest tile's times their count, and an edge tile with one margin came 1 byte short."""
    from test_tiles import TILED

    im = photo(*size).convert("L")
    r = pillow_nif.fit.encode_image(im, quality=1, effort=1, config=TILED, measure=False)
    assert r.tiles[0] * r.tiles[1] > 1 and len(r.data) * 8 <= quality_bpp(im, 1, {}, "auto", TILED) * size[0] * size[1]


def test_a_small_image_gets_more_bits_a_pixel_than_its_content_at_256x256():
    """quality on a 16x16 or 32x32 crop had come out 1-16 dB below the JPEG at that quality (the law, fitted at
    768x512, gave a small network too few bits, and the 2 bpp cap bound them): a small image now gets the law's bits
    times quality.small_factor (3.27 at 32x32, measured), and may take MAX_BPP's bits of a 256x256 image."""
    tile = photo(32, 32)
    big = Image.new("RGB", (256, 256))
    for y in range(0, 256, 32):
        for x in range(0, 256, 32):
            big.paste(tile, (x, y))  # the same content: 8x8 blocks at the same places, about the same bits a pixel
    for q in (30, 60):
        ratio = quality.payload_bpp(tile, q) / quality.payload_bpp(big, q)
        want = quality.small_factor(32 * 32)
        assert ratio > 2 and want * 2**-0.5 <= ratio <= want * 2**0.5
    assert quality.max_bpp(32, 32) == 64 * quality.MAX_BPP and quality.max_bpp(768, 512) == quality.MAX_BPP
    # the factor falls with the pixels, to 1 at 256x256
    factors = [quality.small_factor(s * s) for s in (8, 16, 24, 32, 100, 128, 200, 256, 768)]
    assert factors == sorted(factors, reverse=True) and factors[-2:] == [1.0, 1.0] and factors[2] > factors[3]
    assert quality.payload_bpp(tile, 100) > quality.MAX_BPP  # past the cap of a large image's
