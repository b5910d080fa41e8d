"""Large images as tiles (format version 9): the grid, the container, the blend, and encodes of small images made to
tile by a low FitConfig.tile_pixels (a real tiled encode is a multi-megapixel fit)."""

import dataclasses
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import pillow_nif
from pillow_nif import bitstream as bs
from pillow_nif import fit, render
from pillow_nif.bitstream import FormatError, TiledFile, TileGrid

from conftest import photo

TILED = fit.FitConfig(tile_pixels=48 * 32)  # a 96x64 image: 2 x 2 tiles of 48x32 (+8 pixels of margin inside)


@pytest.fixture(scope="module")
def tiled():
    """A 96x64 photo at 3.0 bpp, effort 1, as 2 x 2 tiles: (image, EncodeResult)."""
    im = photo(96, 64)
    return im, fit.encode_image(im, bpp=3.0, effort=1, config=TILED, exif=b"Exif\x00\x00tiled")


@pytest.mark.parametrize("size", [(768, 512), (768, 768), (769, 768), (1920, 1080), (1080, 1920), (4032, 3024),
                                  (8000, 6000), (3840, 2560), (10000, 100), (1 << 20, 1)])
def test_tile_grid_keeps_each_tile_under_the_limit_and_near_square(size):
    w, h = size
    columns, rows = fit.tile_grid(w, h, 768 * 768)
    if w * h <= 768 * 768:
        assert (columns, rows) == (1, 1)
        return
    g = TileGrid(w, h, "RGB", columns, rows)
    sides = {(x1 - x0, y1 - y0) for x0, y0, x1, y1 in g.boxes()}
    assert max(a * b for a, b in sides) <= 768 * 768
    assert max(max(a / b, b / a) for a, b in sides) <= max(2.0, w / h, h / w) + 0.01
    # the fewest tiles: one fewer column or row cannot hold the image
    assert -(-w // max(1, columns - 1)) * -(-h // rows) > 768 * 768 or columns == 1 or \
        max(-(-w // (columns - 1)) / -(-h // rows), -(-h // rows) / -(-w // (columns - 1))) > 2
    assert {(1920, 1080): (2, 2), (4032, 3024): (7, 3)}.get(size, (columns, rows)) == (columns, rows)


def test_tile_grid_refuses_an_image_needing_too_many_tiles():
    with pytest.raises(ValueError, match="tiles"):
        fit.tile_grid(1 << 20, 1 << 20, 768 * 768)


@pytest.mark.parametrize("stored,size", [(96, 96), (96, 40), (96, 250), (7, 3), (1000, 999)])
def test_tiles_cover_each_rendered_pixel_once_and_their_weights_sum_to_one(stored, size):
    g = TileGrid(stored, 1, "L", min(4, stored), 1, margin=min(8, stored // min(4, stored) // 2))
    pixels = np.zeros(size)
    weights = np.zeros(size)
    for (x0, _, x1, _), (e0, _, e1, _) in zip(g.boxes(), g.extents()):
        cols = render.covered(x0, x1, stored, size)
        pixels[cols.start : cols.stop] += 1
        ext = render.covered(e0, e1, stored, size)
        weights[ext.start : ext.stop] += render._ramp(ext, stored, size, x0, x1, g.margin)
    assert (pixels == 1).all()
    np.testing.assert_allclose(weights, 1, atol=1e-6)


def test_tiled_encode_writes_version_9_within_budget_with_metadata_once(tiled):
    im, r = tiled
    assert r.data[:8] == bs.MAGIC + bytes([9]) and r.tiles == (2, 2)
    assert len(r.data) <= 3.0 * 96 * 64 / 8 and r.bpp > 0.9 * 3.0
    info = pillow_nif.info(r.data)
    assert (info["width"], info["height"], info["tiles"], info["metadata"]) == (96, 64, [2, 2], ["exif"])
    # Each tile's own network: their rates, so their widths and post-filters, follow their content (the top-left
    # tile's had been reported as the file's).
    tiles = bs.loads(r.data).tiles
    assert [n["genesis_widths"] for n in info["tile_networks"]] == [list(t.header.arch.widths) for t in tiles]
    assert info["params"] == sum(n["params"] for n in info["tile_networks"]) and "genesis_widths" not in info
    f = bs.loads(r.data)
    assert isinstance(f, TiledFile) and f.grid.margin == 8
    assert [t.metadata for t in f.tiles] == [{}] * 4  # stored once, in the container
    assert [(t.header.width, t.header.height) for t in f.tiles] == [(56, 40)] * 4  # 48x32 and the inner margins
    assert r.psnr > 25 and r.fit_psnr > 25  # 48x32 tiles: the untiled file is 31.7 dB


def test_tiled_file_opens_loads_and_thumbnails_like_any_other(tiled):
    im, r = tiled
    with Image.open(io.BytesIO(r.data)) as out:
        assert (out.format, out.size, out.mode, out.info["exif"]) == ("NIF", (96, 64), "RGB", b"Exif\x00\x00tiled")
        out.load()
        got = np.asarray(out)
    np.testing.assert_array_equal(got, render.decode_array(r.data))
    ref = np.asarray(im).astype(float)
    assert 10 * np.log10(255**2 / ((got - ref) ** 2).mean()) == pytest.approx(r.psnr)
    with Image.open(io.BytesIO(r.data)) as out:
        out.thumbnail((48, 48))
        assert out.size == (48, 32)
        small = np.asarray(out).astype(float)
    coarse = np.asarray(im.resize((48, 32), Image.Resampling.BOX)).astype(float)
    assert 10 * np.log10(255**2 / ((small - coarse) ** 2).mean()) > 25
    # larger: the tiles' networks at the new pixels' centres, blended; every 3rd pixel on a stored one
    big = render.decode_array(r.data, size=(3 * 96, 3 * 64)).astype(int)
    assert big.shape == (192, 288, 3) and np.abs(big[1::3, 1::3] - got.astype(int)).max() <= 1


def test_a_tile_rendered_at_its_pixels_coordinates_matches_its_own_decode(tiled):
    """The path of other sizes (each tile at its pixels' coordinates in the whole image), asked for the stored size,
    gives each tile's own decode: the coordinates of a tile's pixels are those it was fitted on."""
    _, r = tiled
    f = bs.loads(r.data)
    for t, ext in zip(f.tiles, f.grid.extents()):
        net = render.load_network(t, "cpu")
        net.filter = None
        cols, rows, vals = render.tile_pixels_at(net, f.grid, ext, 96, 64)
        assert (cols, rows) == (range(ext[0], ext[2]), range(ext[1], ext[3]))
        own = render.render(net, ext[2] - ext[0], ext[3] - ext[1])
        assert np.abs(vals.astype(int) - own).max() <= 1


def test_tiles_blend_across_their_overlap(tiled):
    """Inside a tile the file's pixels are that tile's; on an edge between two, between the two tiles' values."""
    _, r = tiled
    f = bs.loads(r.data)
    whole = render.decode_array(r.data).astype(int)
    own = [render.render(render.load_network(t, "cpu"), t.header.width, t.header.height).astype(int)
           for t in f.tiles]
    # tile 0 (top left) covers columns 0..55, tile 1 columns 40..95; the edge is at 48, the blend over 40..55
    np.testing.assert_array_equal(whole[:24, :40], own[0][:24, :40])
    np.testing.assert_array_equal(whole[:24, 56:], own[1][:24, 16:])
    lo, hi = np.minimum(own[0][:24, 40:56], own[1][:24, :16]), np.maximum(own[0][:24, 40:56], own[1][:24, :16])
    assert ((whole[:24, 40:56] >= lo) & (whole[:24, 40:56] <= hi)).all()


def test_tiled_encode_refuses_too_low_a_bpp_before_fitting(monkeypatch):
    monkeypatch.setattr(fit.Fitter, "fit", lambda *a, **k: pytest.fail("fitted"))
    with pytest.raises(ValueError, match="tiles"):
        fit.encode_image(photo(96, 64), bpp=0.3, effort=1, config=TILED)


def test_encode_many_counts_the_tiled_images_into_one_progress():
    """The progress callable had run to its total and then restarted from 0 for each tiled image."""
    from pillow_nif.batch import encode_batch

    calls = []
    small = photo(24, 16)
    encode_batch([small, photo(96, 64), photo(96, 64).rotate(180)], bpp=3.0, effort=1, config=TILED, measure=False,
                 progress=lambda done, total: calls.append((done, total)))
    done = [d for d, _ in calls]
    assert all(b > a for a, b in zip(done, done[1:])) and calls[-1][0] == calls[-1][1]
    eff = fit.EFFORTS[1]
    alone = fit.fit_work(fit.plan_encode(small, 3.0, "auto", {}, TILED, eff).header, eff, TILED)
    assert calls[0][1] > 2 * alone  # the tiles' steps were in the total from the start


def test_encode_many_tiles_the_large_images_only():
    from pillow_nif.batch import encode_batch

    small, large = photo(40, 30), photo(96, 64)
    out = encode_batch([large, small], bpp=2.0, effort=1, config=TILED, measure=False)
    assert [r.data[8 - 1] for r in out] == [9, bs.loads(out[1].data).version]
    assert [r.tiles for r in out] == [(2, 2), (1, 1)]


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_tiled_encode_keeps_the_mode(mode):
    im = photo(96, 64, "RGBA" if mode == "RGBA" else "L")
    if mode == "RGBA":  # transparent in the top-left tile only: the opaque tiles keep their alpha (one mode a grid)
        alpha = Image.new("L", im.size, 255)
        alpha.paste(Image.linear_gradient("L").resize((30, 20)), (4, 4))
        im.putalpha(alpha)
    if mode == "I;16":
        im = Image.frombytes("I;16", im.size, (np.asarray(im).astype("<u2") * 257).tobytes())
    r = fit.encode_image(im, bpp=3.0, effort=1, config=TILED)
    out = pillow_nif.decode(r.data)
    assert out.mode == mode and out.size == (96, 64) and r.psnr > 22


def test_tiles_hold_none_of_the_images_metadata_and_the_file_one_alpha_value():
    im = photo(96, 64, "RGBA")  # opaque: stored as RGB tiles, the 255 once in the tiled file
    meta = {"icc_profile": b"I" * 300, "exif": b"Exif\x00\x00" + b"E" * 100}
    im.info.update(meta)  # a crop's info is the image's: it had gone into every tile, out of the tiles' bits
    r = fit.encode_image(im, bpp=8.0, effort=1, config=TILED)
    f = bs.loads(r.data)
    assert f.grid.mode == "RGB" and f.metadata == meta | {"alpha": b"\xff"}
    assert [t.metadata for t in f.tiles] == [{}] * 4
    out = pillow_nif.decode(r.data)
    assert out.mode == "RGBA" and out.info == meta and (np.asarray(out)[..., 3] == 255).all()
    assert Image.open(io.BytesIO(r.data)).mode == "RGBA" and pillow_nif.info(r.data)["alpha"] == 255


def test_a_tiled_files_alpha_ends_are_chosen_over_the_blended_tiles():
    im = photo(96, 64, "RGBA")
    alpha = np.full((64, 96), 255, np.uint8)
    alpha[10:54, 20:76] = 0  # a hole across all four tiles
    im.putalpha(Image.fromarray(alpha))
    r = fit.encode_image(im, bpp=3.0, effort=1, config=TILED)
    f = bs.loads(r.data)
    assert "alpha_ends" in f.metadata and [t.metadata for t in f.tiles] == [{}] * 4  # the file's, once
    out = np.asarray(pillow_nif.decode(r.data))[..., 3]
    assert (out[alpha == 0] == 0).mean() > 0.98 and (out[alpha == 255] == 255).mean() > 0.98


# ---- the container, against hostile bytes -----------------------------------------------------------------------


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">4sI", kind, len(payload)) + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _tiled_bytes(grid_payload: bytes, tiles: list[bytes]) -> bytes:
    return bs.MAGIC + bytes([9]) + _chunk(b"TILE", grid_payload) + b"".join(_chunk(b"TDAT", t) for t in tiles)


def test_hostile_tiled_files_raise_format_errors(tiled):
    _, r = tiled
    f = bs.loads(r.data)
    tiles = [bs.dumps(t) for t in f.tiles]
    grid = struct.pack(">IIBHHH", 96, 64, 3, 2, 2, 8)
    assert isinstance(bs.loads(_tiled_bytes(grid, tiles)), TiledFile)
    cases = {
        "3 of 4 tiles": _tiled_bytes(grid, tiles[:3]),
        "more tiles than": _tiled_bytes(grid, tiles + tiles[:1]),
        "its place": _tiled_bytes(struct.pack(">IIBHHH", 96, 64, 3, 2, 2, 4), tiles),  # margins of another grid
        "56x40 RGB, its place 56x40 L": _tiled_bytes(struct.pack(">IIBHHH", 96, 64, 1, 2, 2, 8), tiles),
        "itself be tiled": _tiled_bytes(grid, [r.data] + tiles[1:]),
        "bad tile grid": _tiled_bytes(struct.pack(">IIBHHH", 96, 64, 3, 97, 1, 0), tiles),
        "margin": _tiled_bytes(struct.pack(">IIBHHH", 96, 64, 3, 2, 2, 17), tiles),
        "out of range": _tiled_bytes(struct.pack(">IIBHHH", 0, 64, 3, 2, 2, 8), tiles),
        "grid chunk length": _tiled_bytes(grid[:-1], tiles),
        "must be its tile grid": bs.MAGIC + bytes([9]) + _chunk(b"TDAT", tiles[0]),
        "duplicate": _tiled_bytes(grid, tiles) + _chunk(b"TILE", grid),
        "truncated": r.data[:-5],
    }
    for message, data in cases.items():
        with pytest.raises(FormatError, match=message):
            bs.loads(data)
        with pytest.raises((OSError, SyntaxError)):
            with Image.open(io.BytesIO(data)) as im:
                im.load()


def test_a_tiled_header_names_a_grid_without_allocating():
    data = _tiled_bytes(struct.pack(">IIBHHH", 1 << 20, 1 << 20, 3, 4096, 1, 0), [])
    assert bs.read_header(data).width == 1 << 20
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    with pytest.raises(FormatError, match="0 of 4096 tiles"):
        bs.loads(data)


# ---- the tiles' share of the bits ---------------------------------------------------------------------------------


def _half_smooth(width, height, ramp=False):
    """The test photo with its left half smoothed (blurred, or a ramp): tiles of very different content."""
    from PIL import ImageFilter

    im = photo(width, height)
    a = np.asarray(im).copy()
    smooth = np.asarray(im.filter(ImageFilter.GaussianBlur(4)))
    if ramp:
        smooth = np.broadcast_to(np.linspace(60, 200, width)[None, :, None], a.shape).astype(np.uint8)
    a[:, : width // 2] = smooth[:, : width // 2]
    return Image.fromarray(a)


def test_tile_rates_give_busy_tiles_more_bits_within_the_mean():
    from pillow_nif.tiles import tile_rates

    im = _half_smooth(192, 64, ramp=True)
    boxes = [(0, 0, 48, 64), (48, 0, 96, 64), (96, 0, 144, 64), (144, 0, 192, 64), (90, 0, 192, 64)]
    area = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
    crops = [im.crop(box) for box in boxes]
    rates = tile_rates(crops, fit.FitConfig())
    assert rates[0] == rates[1] == min(rates) < 1 < max(rates) == rates[3]  # the ramp's tiles least, the photo's most
    assert np.average(rates, weights=area) == pytest.approx(1, abs=1e-12)  # every byte of the share, none over
    lo, hi = fit.FitConfig().tile_rate_range
    assert min(rates) >= lo * 0.99 and max(rates) <= hi * 1.2  # the range, up to the rounding's leftover
    assert tile_rates(crops, fit.FitConfig(tile_rate_exponent=0)) == [1.0] * 5
    same = Image.fromarray(np.tile(np.asarray(photo(48, 64)), (1, 4, 1)))
    # like tiles alike: one stacked fit
    assert len(set(tile_rates([same.crop(box) for box in boxes[:4]], fit.FitConfig()))) == 1


def test_tile_rates_of_narrow_16_bit_data_are_those_of_the_same_picture_in_8_bits():
    """8-bit values in I;16 had been measured by an 8-bit JPEG of their 1/257: the tiles ranked by noise, and a
    tiled file of them came out 2.9 dB under the same picture in L (64x48 in 32x24 tiles, 4 bpp, effort 1)."""
    from pillow_nif.tiles import tile_rates

    grey = photo(128, 96, "L")
    values = np.asarray(grey, dtype=np.int64)
    boxes = [(x, y, x + 32, y + 32) for y in range(0, 96, 32) for x in range(0, 128, 32)]
    want = tile_rates([grey.crop(b) for b in boxes], fit.FitConfig())
    assert max(want) > 1.5 * min(want)
    for deep in (values, values * 16 + 3, values * 257):  # 8-bit values in I;16, 12-bit, full range
        im = Image.fromarray(deep.astype(np.uint16))
        assert tile_rates([im.crop(b) for b in boxes], fit.FitConfig()) == pytest.approx(want, rel=1e-9)


def test_a_tiled_encode_spends_its_bytes_where_the_detail_is():
    """The same image and budget with the tiles' rates by content and with one rate: the busy tiles get the bytes,
    the file stays within its budget, and its PSNR is higher (31.8 against 28.5 dB: a smooth half needs few bits)."""
    im = _half_smooth(192, 128)
    tiled = fit.FitConfig(tile_pixels=96 * 64)
    by_content = fit.encode_image(im, bpp=1.0, effort=1, config=tiled)
    uniform = fit.encode_image(im, bpp=1.0, effort=1, config=dataclasses.replace(tiled, tile_rate_exponent=0))
    for r in (by_content, uniform):
        assert len(r.data) <= 1.0 * 192 * 128 / 8 and r.tiles == (2, 2)
    sizes = [len(bs.dumps(t)) for t in bs.loads(by_content.data).tiles]  # top left, top right, bottom left, ...
    assert max(sizes[0], sizes[2]) < min(sizes[1], sizes[3])
    assert by_content.psnr > uniform.psnr + 1


def test_a_tile_of_one_colour_is_a_constant_file_and_the_others_take_its_bytes():
    """A page's blank margin as a tile: it had spent half the mean share on a flat area (501 of 3060 bytes here);
    as a constant file it takes ~70 and the photo's tiles the rest (+1.7 dB on them)."""
    a = np.asarray(photo(192, 64)).copy()
    a[:, 110:] = 255  # the third tile's extent (120 - 8 ...) is all white
    r = fit.encode_image(Image.fromarray(a), bpp=2, effort=1, config=fit.FitConfig(tile_pixels=64 * 64))
    sizes = [len(bs.dumps(t)) for t in bs.loads(r.data).tiles]
    assert r.tiles == (3, 1) and sizes[2] < 90 and 0.9 * 3072 <= len(r.data) <= 3072
    out = np.asarray(pillow_nif.decode(r.data))
    assert (out[:, 136:] == 255).all()  # past the blend with the middle tile (128 +- 8)


def test_encode_many_takes_one_bpp_per_image():
    from pillow_nif.batch import encode_batch
    from pillow_nif.fit import FitConfig, quality_bpp

    images = [photo(40, 30), photo(40, 30)]
    out = encode_batch(images, bpp=[1.5, 4.0], effort=1, measure=False)
    assert len(out[0].data) <= 1.5 * 40 * 30 / 8 < 4.0 * 40 * 30 / 8 * 0.8 < len(out[1].data) <= 4.0 * 40 * 30 / 8
    with pytest.raises(ValueError, match="2 entries for 3 images"):
        encode_batch(images + images[:1], bpp=[1.5, 4.0], effort=1)
    with pytest.raises(ValueError, match="bpp must be a positive number"):
        encode_batch(images, bpp=[1.5, -1], effort=1)
    # an array as a list; None takes quality's bpp (it was float(None)'s TypeError from inside)
    same = encode_batch(images, bpp=np.array([1.5, 4.0]), effort=1, measure=False)
    assert [r.data for r in same] == [r.data for r in out]
    mixed = encode_batch(images, bpp=[None, 4.0], quality=90, effort=1, measure=False)
    asked = quality_bpp(images[0], 90, {}, "auto", FitConfig())
    assert mixed[1].data == out[1].data and 0.9 * asked <= mixed[0].bpp <= asked


def test_the_tiles_jpeg_measure_takes_sides_past_jpegs_limit():
    """A tile of a long image (1 x 600000) can be longer than JPEG's 65 500 pixels, which Pillow's writer refuses
    ("broken data stream"): the measure codes blocks, which at multiples of 8 pixels give the whole JPEG's error."""
    from pillow_nif import tiles

    rng = np.random.default_rng(3)
    assert tiles._jpeg_error(rng.random((2, 70000, 1))) > 0
    plane = rng.random((20, 4100, 1))
    u8 = np.round(plane[..., 0] * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, "JPEG", quality=tiles.RANK_QUALITY)
    whole = np.mean((np.asarray(Image.open(buf), dtype=np.float64) - u8) ** 2)
    assert tiles._jpeg_error(plane) == pytest.approx(whole, rel=1e-12)
