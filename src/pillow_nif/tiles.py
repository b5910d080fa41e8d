"""Large images as a grid of tiles (format version 9): each tile its own network, fitted together.

One network's fitting work grows as the square of the image's pixels at a given bpp: its parameters grow with
them, and so does a step's share of the image (at least 1/64, fit.step_stride). At effort 5 and 0.5 bpp a
1920x1080 photo is 28 times the work of a 768x512 encode and a 12-megapixel one 965 times (on this project's 2-core
CPU, weeks); as tiles of at most FitConfig.tile_pixels, 5.7 and 48 times: linear in the pixels. The tiles of one
size are the like images batch.encode_batch fits as one stacked network (on a GPU, batched matmuls over the tiles).

The file's bytes are shared out in proportion to each tile's pixels (one bpp for every tile), after the tiled
container's own (bitstream.tiled_overhead); the metadata is stored once, in the container. Each tile's network is
fitted to its box grown by FitConfig.tile_margin pixels beyond each edge it shares with another tile; the decoder
blends neighbours across those margins (render.render_tiled), at the stored size or any other.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from . import bitstream, fit


def plan_tiles(image, target_bpp: float, metadata: dict, colour: str, cfg: fit.FitConfig, effort: fit.Effort):
    """(grid, the tiles' bpp, the file's budget in bytes) of an image over cfg.tile_pixels; OSError for a mode NIF
    cannot hold and ValueError for a budget too small for the tiles, before any work."""
    from .imaging import storage_mode

    mode = storage_mode(image)
    w, h = image.size
    columns, rows = fit.tile_grid(w, h, cfg.tile_pixels)
    margin = min(cfg.tile_margin, w // columns // 2, h // rows // 2)  # as bitstream._check_grid allows
    grid = bitstream.TileGrid(w, h, mode, columns, rows, margin)
    extents = grid.extents()
    outer, per_tile = bitstream.tiled_overhead(metadata)
    budget = int(target_bpp * w * h // 8)
    # One bpp for all tiles, over the pixels their networks cover (the overlaps twice); a byte a tile kept back, so
    # that no tile's float budget rounds above its share.
    share = budget - outer - (per_tile + 1) * len(extents)
    tile_bpp = 8 * share / sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in extents)
    try:
        if share <= 0:
            raise ValueError("nothing is left for the networks")
        sizes = {(x1 - x0, y1 - y0): (x0, y0, x1, y1) for x0, y0, x1, y1 in extents}
        for box in sizes.values():  # a tile of each size is planned as encode_batch will plan it
            fit.plan_encode(image.crop(box), tile_bpp, colour, {}, cfg, effort)
    except ValueError as e:
        raise ValueError(f"bpp={target_bpp} gives {budget} bytes for a {w}x{h} image, stored as "
                         f"{grid.columns}x{grid.rows} tiles: too few for their networks ({e})") from e
    return grid, tile_bpp, budget


def encode_tiled(image, target_bpp: float, effort: int, device: str, seed: int, progress, metadata: dict,
                 colour: str, cfg: fit.FitConfig, measure: bool, plan: tuple | None = None) -> fit.EncodeResult:
    """encode_image for an image over cfg.tile_pixels (options already checked): a version-9 file. `plan`: what
    plan_tiles gave for it (encode_batch checks every image before fitting any), else made here."""
    from .batch import encode_batch
    from .imaging import prepare_image

    t0 = time.perf_counter()
    metadata = {k: bytes(v) for k, v in metadata.items() if v}
    grid, tile_bpp, budget = plan or plan_tiles(image, target_bpp, metadata, colour, cfg, fit.EFFORTS[effort])
    w, h, boxes = grid.width, grid.height, grid.extents()
    results = encode_batch([image.crop(box) for box in boxes], bpp=tile_bpp, effort=effort, device=device, seed=seed,
                           progress=progress, colour=colour, config=dataclasses.replace(cfg, tile_pixels=0),
                           measure=measure)  # a tile's extent may exceed tile_pixels by its margins: never tiled
    data = bitstream.dumps_tiled(bitstream.TiledFile(grid, [r.data for r in results], metadata))
    if len(data) > budget:  # cannot happen by the shares above; a file over its budget is never written
        raise AssertionError(f"tiled file of {len(data)} bytes over its budget of {budget}")
    psnr = fit_psnr = None
    if measure:
        pixels, _, maxval = prepare_image(image)
        from .render import decode_array

        psnr = fit._psnr(decode_array(data, device=device), np.round(pixels * maxval), maxval)
        # the fit's MSE: each tile's over its extent, weighted by its pixels (the overlaps count twice)
        area = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
        mse = sum(a * maxval**2 / 10 ** (r.fit_psnr / 10) for r, a in zip(results, area)) / sum(area)
        fit_psnr = 10 * math.log10(maxval**2 / mse) if mse > 0 else math.inf
    return fit.EncodeResult(data, len(data) * 8 / (w * h), psnr, time.perf_counter() - t0, fit_psnr,
                            results[0].arch, (grid.columns, grid.rows))
