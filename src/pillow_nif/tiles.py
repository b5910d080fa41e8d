"""Large images as a grid of tiles (format version 9): each tile its own network, fitted together.

One network's fitting work grows as the square of the image's pixels at a given bpp: its parameters grow with
them, and so does a step's share of the image (at least 1/64, fit.step_stride). At effort 5 and 0.5 bpp a
1920x1080 photo is 28 times the work of a 768x512 encode and a 12-megapixel one 965 times (on this project's 2-core
CPU, weeks); as tiles of at most FitConfig.tile_pixels, 5.7 and 48 times: linear in the pixels. The tiles of one
size and rate are the like images batch.encode_batch fits as one stacked network (on a GPU, batched matmuls over
the tiles).

The file's bytes, after the tiled container's own (bitstream.tiled_overhead), are shared out by each tile's pixels
and content (tile_rates): a busy tile gets more bits a pixel than a flat one. The metadata is stored once, in the
container. Each tile's network is fitted to its box grown by FitConfig.tile_margin pixels beyond each edge it shares
with another tile; the decoder blends neighbours across those margins (render.render_tiled), at the stored size or
any other.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time

import numpy as np

from . import bitstream, fit


# The quality of the JPEG whose error ranks the tiles (tile_rates). Across the 24 Kodak images the log of that error
# (each channel as a greyscale JPEG) followed the log of the effort-5 file's MSE at 0.3 / 0.5 / 1.0 bpp with
# correlation 0.980 / 0.985 / 0.982 (quality 75: 0.96-0.98; the error of a 4x smaller copy: 0.92-0.94), at a slope
# of 1.5; 8 ms for a 768x512 image. NOTES.md #198.
RANK_QUALITY = 30
# Rates are rounded to quarter-octave levels, so that like tiles keep one architecture and are still fitted as one
# stacked network.
RATE_LEVELS = 4


def _jpeg_error(pixels: np.ndarray) -> float:
    """Mean square error, in 8-bit units, of pixels (H, W, C in [0, 1]) through a JPEG at RANK_QUALITY, each channel
    a greyscale image (any mode; no chroma subsampling to favour one channel)."""
    from PIL import Image

    from .quality import jpegs

    err = 0.0
    for c in range(pixels.shape[2]):
        plane = Image.fromarray(np.round(pixels[..., c] * 255).astype(np.uint8))
        for block, data in jpegs(plane, RANK_QUALITY):  # in blocks: a tile of a long image may pass JPEG's limit
            with Image.open(io.BytesIO(data)) as im:
                err += float(np.sum((np.asarray(im, dtype=np.float64) - np.asarray(block, dtype=np.float64)) ** 2))
    return err / (pixels.shape[0] * pixels.shape[1] * pixels.shape[2])


def tile_rates(crops, cfg: fit.FitConfig) -> list[float]:
    """Each tile's bpp (crops: PIL images of the tiles' extents) relative to the tiles' mean (their mean, weighted by
    their pixels, is 1): proportional to its _jpeg_error ** cfg.tile_rate_exponent within cfg.tile_rate_range, in
    steps of 1/RATE_LEVELS octave (then all scaled by the same factor, up to 1.19, to spend what the rounding left).

    Why: the whole image's MSE is the tiles' mean, and a tile's MSE at r bpp goes about as a / r (the 24 Kodak
    images' effort-5 files: slopes -0.82 ... -1.26 in log-log, 0.3 to 1.0 bpp), so the bits are best spent where
    the slopes a / r**2 are equal: r proportional to sqrt(a). A tile's a goes as its JPEG error to the power 1.5,
    hence 0.75. NOTES.md #198."""
    from .imaging import prepare_image

    if cfg.tile_rate_exponent == 0 or len(crops) < 2:
        return [1.0] * len(crops)
    area = np.array([c.width * c.height for c in crops], dtype=np.float64)
    pixels = [prepare_image(c) for c in crops]
    scale = 1.0
    if pixels[0][1] == "I;16":
        # By the 8 highest bits in use, as quality.planes measures an image: an 8-bit JPEG of 16-bit data's 1/257 had
        # ranked tiles of 8-bit values in I;16 by noise (a tiled file 2.9 dB under the same picture in L).
        top = round(max(float(p.max(initial=0)) for p, _, _ in pixels) * 65535)
        scale = 2.0 ** (16 - max(1, top.bit_length()))
    err = np.array([_jpeg_error(np.minimum(p * scale, 1.0)) for p, _, _ in pixels])
    weight = (err + 0.01) ** cfg.tile_rate_exponent  # + 0.01: a flat tile's error is 0
    lo, hi = cfg.tile_rate_range

    def rates(scale: float) -> np.ndarray:  # non-decreasing in scale
        level = np.floor(RATE_LEVELS * np.log2(np.clip(scale * weight, lo, hi)) + 1e-9)
        return np.clip(2.0 ** (level / RATE_LEVELS), lo, hi)

    # the largest scale whose rates' mean is at most 1 (bisection in log space), then the rounding's leftover
    # shared by all: like tiles stay alike
    a, b = 1e-12 / weight.max(), 1e12 / weight.min()
    for _ in range(200):
        mid = math.sqrt(a * b)
        a, b = (mid, b) if np.average(rates(mid), weights=area) <= 1 else (a, mid)
    r = rates(a)
    return [float(x) for x in r / np.average(r, weights=area)]


def grid_of(w: int, h: int, mode: str, cfg: fit.FitConfig) -> bitstream.TileGrid:
    """The tiles a w x h image in `mode` is stored as (fit.tile_grid), with their margins."""
    columns, rows = fit.tile_grid(w, h, cfg.tile_pixels)
    margin = min(cfg.tile_margin, w // columns // 2, h // rows // 2)  # as bitstream._check_grid allows
    return bitstream.TileGrid(w, h, mode, columns, rows, margin)


def plan_tiles(image, target_bpp: float, metadata: dict, colour: str, cfg: fit.FitConfig, effort: int):
    """(grid, each tile's bpp, the file's budget in bytes, the optimiser steps of the tiles' fits: what a progress
    bar over several images counts for this one) of an image over cfg.tile_pixels; OSError for a mode NIF cannot
    hold and ValueError for a budget too small for the tiles, before any work."""
    from .imaging import storage_mode

    mode = storage_mode(image)
    w, h = image.size
    grid = grid_of(w, h, mode, cfg)
    extents = grid.extents()
    outer, per_tile = bitstream.tiled_overhead(metadata)
    budget = int(target_bpp * w * h // 8)
    crops = [image.crop(box) for box in extents]
    area = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in extents]
    # A tile of one colour (a page's margin, a flat background) is a constant file of ~70 bytes (fit.constant_file).
    flat = {i: len(d) for i, c in enumerate(crops) if (d := fit.constant_file(c, {}, budget, cfg)) is not None}
    fitted = [i for i in range(len(crops)) if i not in flat]
    # The bits over the pixels the other networks cover (the overlaps twice), shared by tile_rates; a byte a tile
    # kept back, so that no tile's float budget rounds above its share.
    share = budget - outer - (per_tile + 1) * len(extents) - sum(flat.values())
    mean_bpp = 8 * share / max(1, sum(area[i] for i in fitted))

    def check(bpps) -> int:  # each tile planned as encode_batch will plan it (like tiles once); their fits' steps
        if share <= 0:
            raise ValueError("nothing is left for the networks")
        planned = {}
        for i in fitted:
            if (key := (crops[i].size, bpps[i])) not in planned:
                eff = fit.effort_for(effort, *crops[i].size, cfg)
                planned[key] = fit.plan_encode(crops[i], bpps[i], colour, {}, cfg, eff).header, eff
        return sum(fit.fit_work(*planned[crops[i].size, bpps[i]], cfg) for i in fitted)

    uniform = [mean_bpp] * len(extents)
    try:
        bpps = list(uniform)
        if share > 0:
            for i, r in zip(fitted, tile_rates([crops[i] for i in fitted], cfg)):
                bpps[i] = mean_bpp * r
        try:
            work = check(bpps)
        except ValueError:  # a flat tile's share too small for a network: one bpp for all, if that is enough
            bpps = list(uniform)
            work = check(bpps)
    except ValueError as e:
        raise ValueError(f"bpp={target_bpp} gives {budget} bytes for a {w}x{h} image, stored as "
                         f"{grid.columns}x{grid.rows} tiles: too few for their networks ({e})") from e
    for i, n in flat.items():  # room for exactly its file (the byte kept back covers the rounding)
        bpps[i] = 8 * (n + 1) / area[i]
    return grid, bpps, budget, work


def encode_tiled(image, target_bpp: float, effort: int, device: str, seed: int, progress, metadata: dict,
                 colour: str, cfg: fit.FitConfig, measure: bool, plan: tuple | None = None) -> fit.EncodeResult:
    """encode_image for an image over cfg.tile_pixels (options already checked): a version-9 file. `plan`: what
    plan_tiles gave for it (encode_batch checks every image before fitting any), else made here."""
    from .batch import encode_batch
    from .imaging import prepare_image

    t0 = time.perf_counter()
    metadata = {k: bytes(v) for k, v in metadata.items() if v}
    grid, tile_bpps, budget, _ = plan or plan_tiles(image, target_bpp, metadata, colour, cfg, effort)
    w, h, boxes = grid.width, grid.height, grid.extents()
    # tile_pixels 0: an extent may exceed tile_pixels by its margins, and is never tiled again. No metadata: the
    # file holds it once (a crop's info is the image's, and its ICC profile and EXIF had gone into every tile, out
    # of the tile's bits). keep_alpha: the grid has one mode, so an opaque tile of a partly transparent image keeps
    # its alpha. exact: the colours under an alpha of 0 were filled over the whole image (exact=False) already.
    results = encode_batch([image.crop(box) for box in boxes], bpp=tile_bpps, effort=effort, device=device, seed=seed,
                           progress=progress, colour=colour, config=dataclasses.replace(cfg, tile_pixels=0),
                           measure=measure, icc_profile=b"", exif=b"", xmp=b"", keep_alpha=True, exact=True)
    data = bitstream.dumps_tiled(bitstream.TiledFile(grid, [r.data for r in results], metadata))
    if len(data) > budget:  # cannot happen by the shares above; a file over its budget is never written
        raise AssertionError(f"tiled file of {len(data)} bytes over its budget of {budget}")
    pixels = None
    if "alpha_ends" in metadata:  # chosen over the blended tiles, as a decoder shows them
        pixels, _, maxval = prepare_image(image)
        data = fit.add_alpha_ends(data, pixels, device)
    psnr = fit_psnr = None
    if measure:
        if pixels is None:
            pixels, _, maxval = prepare_image(image)
        from .render import decode_array

        psnr = fit._psnr(decode_array(data, device=device), np.round(pixels * maxval), maxval)
        # the fit's MSE: each tile's over its extent, weighted by its pixels (the overlaps count twice)
        area = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
        mse = sum(a * maxval**2 / 10 ** (r.fit_psnr / 10) for r, a in zip(results, area)) / sum(area)
        fit_psnr = 10 * math.log10(maxval**2 / mse) if mse > 0 else math.inf
    return fit.EncodeResult(data, len(data) * 8 / (w * h), psnr, time.perf_counter() - t0, fit_psnr,
                            results[0].arch, (grid.columns, grid.rows))
