"""Decoding: rebuild the network from a .nif file and evaluate it over a pixel grid of any size.

Backends: "torch" (CPU or CUDA, the reference maths of model.py in bands of rows) and "triton"
(the fused kernel of pillow_nif.kernels, CUDA; on the CPU only under TRITON_INTERPRET=1).
"auto" picks Triton on CUDA when it is installed, torch otherwise.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from . import bitstream, entropy, postfilter
from .bitstream import FormatError, NifFile

BACKENDS = ("auto", "torch", "triton")
# Pixels evaluated per band: bounds the activations' memory (layer width x 4 bytes x this many pixels),
# for layers up to _BAND_WIDTH wide; bands of wider networks have proportionally fewer pixels, so a tiny
# file declaring 2048-wide layers cannot ask for 8x the memory (16 GiB per activation on a GPU).
_CPU_BAND_PIXELS = 1 << 14
_GPU_BAND_PIXELS = 1 << 21
_BAND_WIDTH = 256


def read_bytes(data_or_path) -> bytes:
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        return bytes(data_or_path)
    if hasattr(data_or_path, "read"):
        return data_or_path.read()
    with open(os.fspath(data_or_path), "rb") as f:
        return f.read()


def check_size(size, what="size") -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a (width, height) pair, got {size!r}") from None
    if not (1 <= w <= bitstream.MAX_DIM and 1 <= h <= bitstream.MAX_DIM):
        raise ValueError(f"{what} {w}x{h} out of range")
    return w, h


def load_network(f: NifFile, device: str = "cpu"):
    """Entropy decode and dequantise the weights, fold the constants: a model.FoldedNetwork."""
    import torch

    from .model import NIF, fold

    arch = f.header.arch
    shapes = arch.tensor_shapes()
    sizes = [int(np.prod(s)) for _, s in shapes]
    syms = entropy.decode(f.stream, f.codings, sizes, arch.sine_layers() if f.version >= 3 else (), arch.pe_dim)
    weights = {
        name: torch.from_numpy(s.reshape(shape).astype(np.float64) * c.step)
        for (name, shape), s, c in zip(shapes, syms, f.codings)
    }
    model = NIF(arch)
    maxval = (1 << f.header.bits) - 1
    net = fold(model, f.header.colour, float(maxval), weights)
    if arch.filter_mask:
        net.filter = tuple(weights[f"filter.{k}"].float().contiguous() for k in ("mix", "taps", "offset"))
        net.filter_dirs = postfilter.directions(arch.filter_mask)
        net.filter_thresholds = arch.filter_thresholds
    return net.to(device)


def pick_backend(backend: str, device: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.startswith("cuda"):
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

    from .model import evaluate_folded_grid, to_pixels

    device = net.out[0].device
    finish = (lambda v: v) if raw else to_pixels  # noqa: E731
    ys = ((2 * torch.arange(r0, r1, device=device, dtype=torch.float64) + 1) / height - 1).float()
    xs = ((2 * torch.arange(width, device=device, dtype=torch.float64) + 1) / width - 1).float()
    # Columns in pieces of at most max_pixels pixels: a band of one very long row stays bounded too.
    step = width if max_pixels is None else max(1, min(width, max_pixels // max(1, r1 - r0)))
    if step == width:
        vals = finish(evaluate_folded_grid(net, ys, xs))
    else:  # written into one buffer allocated first: pieces kept alive in between fragment the heap
        vals = torch.empty((r1 - r0, width, net.channels), device=device)
        for c in range(0, width, step):
            piece = evaluate_folded_grid(net, ys, xs[c : c + step])
            vals[:, c : c + step] = finish(piece).reshape(r1 - r0, -1, net.channels)
    # NaN (hostile hyperparameters: sin(inf)) -> 0, as the Triton kernel's clamp gives; its cast is undefined.
    vals = torch.nan_to_num_(vals, nan=0.0).reshape(r1 - r0, width, -1)
    return vals if raw else vals.to(torch.uint8 if net.maxval == 255 else torch.int32)


def render(net, width: int, height: int, backend: str = "torch", raw: bool = False) -> np.ndarray:
    """(height, width, channels) integer pixels; evaluated band by band to bound memory. A network with a
    post-filter (net.filter) is filtered: callers drop it for sizes other than the stored one. With `raw`: the
    network's float32 values in [0, maxval], neither rounded nor filtered (what the encoder fits the filter to)."""
    import torch

    on_gpu = net.out[0].device.type == "cuda"
    band = _GPU_BAND_PIXELS if on_gpu else _CPU_BAND_PIXELS
    if backend == "triton":
        from .kernels.nif_decode import render_band
    else:
        widest = max([w.shape[1] for w, _ in (*net.mod, *net.genesis)], default=1)
        band = band * _BAND_WIDTH // max(_BAND_WIDTH, widest)
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


def render_file(f: NifFile, size=None, device: str = "auto", backend: str = "auto") -> np.ndarray:
    """Pixels of a parsed file at its size or at `size` = (width, height)."""
    from .fit import resolve_device

    device = resolve_device(device)
    backend = pick_backend(backend, device)
    w, h = check_size(size) if size is not None else (f.header.width, f.header.height)
    net = load_network(f, device)
    if (w, h) != (f.header.width, f.header.height):
        net.filter = None  # the post-filter belongs to the stored size (postfilter.py)
    return render(net, w, h, backend)


def decode_array(data_or_path, size=None, device: str = "auto", backend: str = "auto") -> np.ndarray:
    """(height, width, channels) uint8 (uint16 for I;16) pixels of a .nif file."""
    return render_file(bitstream.loads(read_bytes(data_or_path)), size, device, backend)


def decode(data_or_path, size=None, device: str = "auto", backend: str = "auto"):
    """Decode a .nif file (bytes, path or file object) to a PIL image, at its size or at `size`."""
    from PIL import Image

    from .fit import resolve_device
    from .imaging import to_image

    device = resolve_device(device)  # option errors before any work
    pick_backend(backend, device)
    f = bitstream.loads(read_bytes(data_or_path))
    w, h = check_size(size) if size is not None else (f.header.width, f.header.height)
    Image._decompression_bomb_check((w, h))
    im = to_image(render_file(f, (w, h), device, backend), f.header.mode)
    im.info.update(f.metadata)
    return im


def info(data_or_path) -> dict:
    """Header and chunk facts of a .nif file, without decoding pixels (and without torch)."""
    data = read_bytes(data_or_path)
    f = bitstream.loads(data)
    h = f.header
    a = h.arch
    return {
        "format": "NIF",
        "version": f.version,
        "width": h.width,
        "height": h.height,
        "mode": h.mode,
        "colour": {0: "rgb", 1: "ycbcr"}[h.colour],
        "bytes": len(data),
        "bpp": len(data) * 8 / (h.width * h.height),
        "params": a.num_params(),
        "genesis_widths": list(a.widths),
        "pe_freqs": a.pe_freqs,
        "pe_scale": a.pe_scale,
        "omega": a.omega,
        "modulation_widths": list(a.mod_widths),
        "modulation_freqs": a.mod_freqs,
        "post_filter_taps": a.filter_taps,
        "post_filter_classes": a.filter_classes,
        "metadata": sorted(f.metadata),
    }


__all__ = ["decode", "decode_array", "info", "load_network", "render", "FormatError"]
