"""Decoding: rebuild the network from a .nif file and evaluate it over a pixel grid of any size.

Backends: "torch" (CPU or CUDA, the reference maths of model.py in bands of rows) and "triton"
(the fused kernel of pillow_nif.kernels, CUDA; on the CPU only under TRITON_INTERPRET=1).
"auto" picks Triton on CUDA when it is installed, torch otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import os
import warnings

import numpy as np

from . import bitstream, entropy, postfilter
from .bitstream import FormatError, NifFile, TiledFile

BACKENDS = ("auto", "torch", "triton")


def check_device(device) -> None:
    """ValueError unless `device` names a device ('auto', 'cpu', 'cuda', 'cuda:N'); whether it is there is
    resolve_device's to say."""
    if not isinstance(device, str) or not (
        device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def resolve_device(device: str) -> str:
    import torch

    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    if device != "cuda" and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"no such CUDA device: {device!r}")
    return device


def on_device(device: str):
    """A context that makes a resolved `device` CUDA's current one in this thread: Triton launches its kernels, and
    CUDA graphs capture, on the current device, not on their tensors' (a decode on cuda:1 had launched on GPU 0 with
    GPU 1's pointers). The CPU and plain "cuda" (the current device) need nothing."""
    if device.startswith("cuda:"):
        import torch

        return torch.cuda.device(int(device[5:]))
    return contextlib.nullcontext()


# Pixels evaluated per band: bounds the activations' memory (layer width x 4 bytes x this many pixels),
# for layers up to _BAND_WIDTH wide; bands of wider networks have proportionally fewer pixels, so a tiny
# file declaring 2048-wide layers cannot ask for 8x the memory (16 GiB per activation on a GPU).
_CPU_BAND_PIXELS = 1 << 14
_GPU_BAND_PIXELS = 1 << 21
_BAND_WIDTH = 256
# Set when the Triton decoder failed in this process under backend="auto" (render_file): auto takes torch after it.
_triton_failed = False


def read_bytes(data_or_path) -> bytes:
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        return bytes(data_or_path)
    if hasattr(data_or_path, "read"):
        return data_or_path.read()
    with open(os.fspath(data_or_path), "rb") as f:
        return f.read()


def check_size(size, what="size") -> tuple[int, int]:
    # integers only: int() of each item took "55" as 5x5 and (True, True) as 1x1
    try:
        w, h = size
    except (TypeError, ValueError):
        w = h = None
    # bytes unpack to integers too: b"55" would be 53x53
    if isinstance(size, (bytes, bytearray)) or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                       for v in (w, h)):
        raise ValueError(f"{what} must be a (width, height) pair of integers, got {size!r}")
    w, h = int(w), int(h)
    if not (1 <= w <= bitstream.MAX_DIM and 1 <= h <= bitstream.MAX_DIM):
        raise ValueError(f"{what} {w}x{h} out of range")
    return w, h


def load_network(f: NifFile, device: str = "cpu"):
    """Entropy decode and dequantise the weights, fold the constants: a model.FoldedNetwork."""
    import torch

    from .model import fold

    arch = f.header.arch
    shapes = arch.tensor_shapes()
    syms = entropy.decode_file(f)
    weights = {
        name: torch.from_numpy(s.reshape(shape).astype(np.float64) * c.step)
        for (name, shape), s, c in zip(shapes, syms, f.codings)
    }
    maxval = (1 << f.header.bits) - 1
    net = fold(arch, f.header.colour, float(maxval), weights)
    if arch.filter_mask:
        net.filter = tuple(weights[f"filter.{k}"].float().contiguous() for k in ("mix", "taps", "offset"))
        net.filter_dirs = postfilter.directions(arch.filter_mask)
        net.filter_thresholds = arch.filter_thresholds
    return net.to(device)


def pick_backend(backend: str, device: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.startswith("cuda") and not _triton_failed:
            try:
                import triton  # noqa: F401

                return "triton"
            except ImportError:
                return "torch"
        return "torch"
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise ValueError("backend 'triton' needs the triton package (Linux)") from None
        if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend 'triton' runs on CUDA (or on the CPU with TRITON_INTERPRET=1)")
    return backend


def _torch_band(net, width: int, height: int, r0: int, r1: int, max_pixels: int | None = None, raw: bool = False):
    """Rows [r0, r1) as integer pixels, or with `raw` as float32 values clamped to [0, maxval], not rounded."""
    import torch

    device = net.out[0].device
    ys = ((2 * torch.arange(r0, r1, device=device, dtype=torch.float64) + 1) / height - 1).float()
    xs = ((2 * torch.arange(width, device=device, dtype=torch.float64) + 1) / width - 1).float()
    return _torch_grid(net, ys, xs, max_pixels, raw)


def _torch_grid(net, ys, xs, max_pixels: int | None = None, raw: bool = False):
    """_torch_band's pixels at the grid ys x xs of network coordinates (float32 tensors on the net's device)."""
    import torch

    from .model import evaluate_folded_grid, to_pixels

    device = net.out[0].device
    finish = (lambda v: v) if raw else to_pixels  # noqa: E731
    rows, width = len(ys), len(xs)
    # Columns in pieces of at most max_pixels pixels: a band of one very long row stays bounded too.
    step = width if max_pixels is None else max(1, min(width, max_pixels // max(1, rows)))
    if step == width:
        vals = finish(evaluate_folded_grid(net, ys, xs))
    else:  # written into one buffer allocated first: pieces kept alive in between fragment the heap
        vals = torch.empty((rows, width, net.channels), device=device)
        for c in range(0, width, step):
            piece = evaluate_folded_grid(net, ys, xs[c : c + step])
            vals[:, c : c + step] = finish(piece).reshape(rows, -1, net.channels)
    # NaN (hostile hyperparameters: sin(inf)) -> 0, as the Triton kernel's clamp gives; its cast is undefined.
    vals = torch.nan_to_num_(vals, nan=0.0).reshape(rows, width, -1)
    return vals if raw else vals.to(torch.uint8 if net.maxval == 255 else torch.int32)


def render(net, width: int, height: int, backend: str = "torch", raw: bool = False) -> np.ndarray:
    """(height, width, channels) integer pixels; evaluated band by band to bound memory. A network with a
    post-filter (net.filter) is filtered: callers drop it for sizes other than the stored one. With `raw`: the
    network's float32 values in [0, maxval], neither rounded nor filtered (what the encoder fits the filter to)."""
    import torch

    band = _band_pixels(net, backend)
    if backend == "triton":
        from .kernels.nif_decode import render_band
    else:
        render_band = functools.partial(_torch_band, max_pixels=band)
    rows = max(1, band // width)
    dtype = np.float32 if raw else np.uint8 if net.maxval == 255 else np.uint16
    out = np.empty((height, width, net.channels), dtype=dtype)
    with torch.inference_mode():
        if net.filter is not None and not raw:
            for r0, pixels in _filtered_bands(net, width, height, rows, render_band):
                out[r0 : r0 + len(pixels)] = pixels.cpu().numpy()
            return out
        for r0 in range(0, height, rows):
            r1 = min(height, r0 + rows)
            out[r0:r1] = render_band(net, width, height, r0, r1, raw=raw).cpu().numpy()
    return out


def _filtered_bands(net, width: int, height: int, rows: int, render_band):
    """(first row, integer pixels) of each band of the post-filtered decode. Each band's network values are
    computed once: the rows the next band's filter reaches back to are kept."""
    import torch

    from .model import to_pixels

    weight, bias = postfilter.kernel(*net.filter, net.filter_dirs)
    rad = postfilter.halo(net.filter_dirs, len(net.filter_thresholds) + 1)
    raw, start = None, 0  # network values of image rows [start, start + len(raw)), normalised to [0, 1]
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        lo, hi = max(0, r0 - rad), min(height, r1 + rad)
        have = start + (0 if raw is None else len(raw))
        if raw is not None:
            raw = raw[lo - start :]
        if hi > max(lo, have):  # a last band shorter than the filter's reach may need no new rows
            new = render_band(net, width, height, max(lo, have), hi, raw=True) / net.maxval
            raw = new if raw is None else torch.cat([raw, new])
        start = lo
        near = torch.arange(r0 - rad, r1 + rad, device=raw.device).clamp_(0, height - 1) - start  # edges repeat
        v = postfilter.apply(raw[near], weight, bias, net.filter_thresholds).mul(net.maxval)
        v = torch.nan_to_num_(to_pixels(v.clamp_(0, net.maxval)), nan=0.0)
        yield r0, v.to(torch.uint8 if net.maxval == 255 else torch.int32)


def _band_pixels(net, backend: str) -> int:
    """Pixels of one band on the net's device. The torch path's are fewer for networks wider than _BAND_WIDTH: its
    activations are in memory (bounded); the Triton kernel's stay in registers."""
    band = _GPU_BAND_PIXELS if net.out[0].device.type == "cuda" else _CPU_BAND_PIXELS
    if backend == "triton":
        return band
    widest = max([w.shape[1] for w, _ in (*net.mod, *net.genesis)], default=1)
    return band * _BAND_WIDTH // max(_BAND_WIDTH, widest)


def covered(lo: int, hi: int, stored: int, size: int) -> range:
    """The pixels of an axis rendered at `size` whose centres fall in the stored pixels [lo, hi) (of `stored`):
    pixel j's centre is at (j + 1/2) * stored / size. Adjacent ranges meet exactly, so tiles cover each pixel once."""
    first = lambda edge: -((stored - 2 * edge * size) // (2 * stored))  # noqa: E731  ceil(edge * size / stored - 1/2)
    return range(first(lo), first(hi))


def render_tiled(t: TiledFile, width: int, height: int, device: str, backend: str) -> np.ndarray:
    """A tiled file's pixels at (width, height): each tile's network over the pixels whose centres fall in its
    extent, blended where extents overlap (bitstream.TileGrid). At the stored size each tile is its own decode (its
    post-filter included); at other sizes each is evaluated at its pixels' coordinates, without post-filters. Both
    by `backend`, on `device`. The weighted sums are kept for one row of tiles at a time (float32),
    so the memory beyond the image is that of a row of tiles."""
    g = t.grid
    maxval = (1 << g.bits) - 1
    out = np.empty((height, width, g.channels), dtype=np.uint8 if g.bits == 8 else np.uint16)
    stored = (width, height) == (g.width, g.height)
    tiles = list(zip(t.tiles, g.boxes(), g.extents()))
    acc, start = np.zeros((0, width, g.channels), dtype=np.float32), 0  # sums of output rows [start, start + len)
    for j in range(g.rows):
        row = tiles[j * g.columns : (j + 1) * g.columns]
        rows = covered(row[0][2][1], row[0][2][3], g.height, height)  # the output rows of this row's extents
        acc = np.concatenate([acc, np.zeros((rows.stop - start - len(acc), width, g.channels), np.float32)])
        for f, box, ext in row:
            net = load_network(f, device)
            if stored:
                cols = range(ext[0], ext[2])
                vals = render(net, len(cols), len(rows), backend)
            else:
                cols, _, vals = tile_pixels_at(net, g, ext, width, height, backend)
            wx = _ramp(cols, g.width, width, box[0], box[2], g.margin)
            wy = _ramp(rows, g.height, height, box[1], box[3], g.margin)
            acc[rows.start - start : rows.stop - start, cols.start : cols.stop] += \
                vals * (wy[:, None] * wx[None, :])[..., None]
        # rows the next row of tiles does not reach are complete; weights of 1 (outside the overlaps) give back
        # each tile's integers exactly
        below = tiles[(j + 1) * g.columns][2][1] if j + 1 < g.rows else g.height  # the next row's top edge
        done = covered(below, below, g.height, height).start
        out[start:done] = np.floor(acc[: done - start] + 0.5).clip(0, maxval)
        acc, start = acc[done - start :], done
    return out


def _ramp(idx: range, stored: int, size: int, lo: int, hi: int, margin: int) -> np.ndarray:
    """A tile's blending weights at the centres of pixels `idx` (of an axis rendered at `size`): 1 inside its box
    [lo, hi) but for `margin` pixels from an edge shared with another tile, falling linearly to 0 at `margin` beyond
    it, so that two tiles' weights sum to 1 across their overlap."""
    u = (np.arange(idx.start, idx.stop, dtype=np.float64) + 0.5) * stored / size
    w = np.ones(len(idx))
    if lo > 0:
        w *= np.clip((u - (lo - margin)) / (2 * margin), 0, 1) if margin else u >= lo
    if hi < stored:
        w *= np.clip((hi + margin - u) / (2 * margin), 0, 1) if margin else u < hi
    return w.astype(np.float32)


def tile_pixels_at(net, g, ext, width: int, height: int, backend: str = "torch") -> tuple[range, range, np.ndarray]:
    """(columns, rows, pixels) of an image rendered at (width, height) whose centres fall in the tile extent `ext`
    of grid g: the tile's network (without its post-filter) at their coordinates, on the network's device, by the
    torch path or the Triton kernel (`backend`), in bands of rows."""
    import torch

    (x0, y0, x1, y1) = ext
    cols, rows = covered(x0, x1, g.width, width), covered(y0, y1, g.height, height)
    out = np.empty((len(rows), len(cols), net.channels), dtype=np.uint8 if net.maxval == 255 else np.uint16)
    if not cols or not rows:
        return cols, rows, out
    dev = net.out[0].device
    band = _band_pixels(net, backend)
    if backend == "triton":
        from .kernels.nif_decode import render_band

        evaluate = lambda r0, r1: render_band(net, width, height, r0, r1, cols=cols,  # noqa: E731
                                              tile=(g.width, g.height, ext))
    else:
        xs = _tile_coordinates(cols, g.width, width, x0, x1, dev)
        ys = _tile_coordinates(rows, g.height, height, y0, y1, dev)
        evaluate = lambda r0, r1: _torch_grid(net, ys[r0 - rows.start : r1 - rows.start], xs, band)  # noqa: E731
    step = max(1, band // len(cols))
    with torch.inference_mode():
        for r in range(rows.start, rows.stop, step):
            block = evaluate(r, min(rows.stop, r + step))
            out[r - rows.start : r - rows.start + len(block)] = block.cpu().numpy()
    return cols, rows, out


def _tile_coordinates(idx: range, stored: int, size: int, lo: int, hi: int, device):
    """Network coordinates, in the tile [lo, hi) of a stored axis, of the centres of pixels `idx` at `size`: the
    tile's own pixel i has its centre at (2i + 1) / (hi - lo) - 1, as model.pixel_grid."""
    import torch

    centres = (torch.arange(idx.start, idx.stop, device=device, dtype=torch.float64) + 0.5) * stored / size
    return (2 * (centres - lo) / (hi - lo) - 1).float()


def render_file(f: NifFile | TiledFile, size=None, device: str = "auto", backend: str = "auto") -> np.ndarray:
    """Pixels of a parsed file at its size or at `size` = (width, height): the network's own where larger, the
    stored size resized where smaller (render_grid)."""
    import torch

    device = resolve_device(device)
    chosen = pick_backend(backend, device)
    stored = (f.header.width, f.header.height)
    w, h = check_size(size) if size is not None else stored
    grid = render_grid(stored, (w, h))
    try:
        pixels = _render_file(f, grid, device, chosen)
    except (FormatError, MemoryError, torch.cuda.OutOfMemoryError):
        raise  # the file's fault, or the memory's: the torch path would fail the same way
    except Exception as e:
        if backend != "auto" or chosen != "triton":
            raise
        # The kernels compile at their first launch, for this GPU, with this Triton: one that cannot (an older GPU
        # than the installed Triton supports, no ptxas) would otherwise make every Image.open(...).load() fail.
        global _triton_failed
        _triton_failed = True
        warnings.warn(f"pillow_nif: the Triton decoder failed on {device} ({e!r}); decoding with torch from now on "
                      "(backend='triton' raises it instead)", RuntimeWarning, stacklevel=2)
        pixels = _render_file(f, grid, device, "torch")
    ends = bitstream.alpha_ends(f.metadata, f.header.mode, grid == stored)
    if ends is not None:  # at a larger size too (at most 32 there): a transparent surround stays transparent
        alpha = pixels[..., -1]
        alpha[alpha <= ends[0]] = 0
        alpha[alpha >= 255 - ends[1]] = 255
    return pixels if grid == (w, h) else resample(pixels, (w, h))


def _render_file(f: NifFile | TiledFile, grid: tuple[int, int], device: str, backend: str) -> np.ndarray:
    """render_file's pixels at `grid` (integers, before the alpha's ends and any resampling)."""
    with on_device(device):
        if isinstance(f, TiledFile):
            return render_tiled(f, *grid, device, backend)
        net = load_network(f, device)
        if grid != (f.header.width, f.header.height):
            net.filter = None  # the post-filter belongs to the stored size (postfilter.py)
        return render(net, *grid, backend)


def render_grid(stored: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The grid a decode at `size` evaluates the network on. An axis made smaller is rendered at its stored samples,
    the ones the network was fitted to, and then resampled: between them the network is no low-pass of the image,
    and point samples of it alias (NOTES.md #219)."""
    return max(size[0], stored[0]), max(size[1], stored[1])


def resample(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(height, width, channels) integer pixels resized to `size` as `Image.resize` does by default (bicubic, its
    support widened by the reduction, so antialiased; colours weighted by their alpha)."""
    from PIL import Image

    if pixels.dtype == np.uint16:  # I;16, resized as I (32-bit) where every Pillow version can
        im = Image.fromarray(pixels[..., 0].astype(np.int32)).resize(size, Image.Resampling.BICUBIC)
        return np.asarray(im).clip(0, 65535).astype(np.uint16)[..., None]
    im = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)  # L, LA, RGB or RGBA
    im = im.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(im).reshape(size[1], size[0], -1)


def decode_array(data_or_path, size=None, device: str = "auto", backend: str = "auto") -> np.ndarray:
    """(height, width, channels) uint8 (uint16 for I;16) pixels of a .nif file, the channels it stores (decode adds
    a constant alpha channel)."""
    return render_file(bitstream.loads(read_bytes(data_or_path)), size, device, backend)


def decode(data_or_path, size=None, device: str = "auto", backend: str = "auto"):
    """Decode a .nif file (bytes, path or file object) to a PIL image, at its size or at `size`."""
    from PIL import Image

    from .imaging import to_image

    device = resolve_device(device)  # option errors before any work
    pick_backend(backend, device)
    f = bitstream.loads(read_bytes(data_or_path))
    stored = (f.header.width, f.header.height)
    w, h = check_size(size) if size is not None else stored
    Image._decompression_bomb_check(render_grid(stored, (w, h)))  # a thumbnail renders the stored size first
    alpha = bitstream.constant_alpha(f.metadata, f.header.mode)
    im = to_image(render_file(f, (w, h), device, backend), f.header.mode, alpha)
    im.info.update(bitstream.image_info(f.metadata))
    return im


def info(data_or_path) -> dict:
    """Header and chunk facts of a .nif file, without decoding pixels (and without torch). A tiled file's networks
    differ from tile to tile (their rates follow their content): each is in "tile_networks", row by row."""
    data = read_bytes(data_or_path)
    f = bitstream.loads(data)
    if isinstance(f, TiledFile):
        g = f.grid
        return _file_info(f, data, g.width, g.height, g.mode) | {
            "params": sum(t.header.arch.num_params() for t in f.tiles),
            "tiles": [g.columns, g.rows], "tile_margin": g.margin,
            "tile_networks": [{"version": t.version} | _network_info(t) for t in f.tiles],
        }
    return _file_info(f, data, f.header.width, f.header.height, f.header.mode) | _network_info(f) | {
        "tiles": [1, 1], "tile_margin": 0}


def _file_info(f, data: bytes, width: int, height: int, mode: str) -> dict:
    return {
        "format": "NIF",
        "version": f.version,
        "width": width,
        "height": height,
        "mode": bitstream.shown_mode(mode, f.metadata),
        "alpha": bitstream.constant_alpha(f.metadata, mode),  # the one alpha value of a file that stores it alone
        "alpha_ends": bitstream.alpha_ends(f.metadata, mode),  # (lo, hi): a fitted alpha shown as 0 / 255 beyond
        "bytes": len(data),
        "bpp": len(data) * 8 / (width * height),
        "metadata": sorted(bitstream.image_info(f.metadata)),
    }


def _network_info(f: NifFile) -> dict:
    a = f.header.arch
    return {
        "colour": {0: "rgb", 1: "ycbcr"}[f.header.colour],
        "params": a.num_params(),
        "genesis_widths": list(a.widths),
        "pe_freqs": a.pe_freqs,
        "pe_scale": a.pe_scale,
        "omega": a.omega,
        "modulation_widths": list(a.mod_widths),
        "modulation_freqs": a.mod_freqs,
        "post_filter_taps": a.filter_taps,
        "post_filter_classes": a.filter_classes,
    }


__all__ = ["decode", "decode_array", "info", "load_network", "render", "FormatError"]
