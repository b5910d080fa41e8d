"""The network over one image's strided sub-grids, as a training step evaluates it.

A step samples every s-th row and column of the image from some phase (fit.Fitter.sample), and evaluates
NIF.forward_grid there. This computes the same values, arranged for speed rather than clarity:

- Feature-major activations, (features, pixels): each layer is W @ h with the pixels as the long side of the
  matmul, and the per-pixel period is a (1, pixels) row. The network's layers are narrow (3 to 61 units), and
  pixel-major products with such narrow outputs ran 1.3x slower on the CPU in MKL (4096 pixels, one thread:
  1.9 ms against 1.45 ms for the matmuls of forward and backward of the 0.5 bpp example's network).
- The positional encodings of every row and column are computed once per image, each padded to the full
  encoding width with zeros in the other axis' columns, so the separable first layers are two plain matmuls on
  a slice of rows: no encoding, no column gather and no scatter in the backward at each step.
- Constant factors (the modulation's omega and sigma, a plain network's period) ride on the matmuls as alpha
  and beta instead of a pass over the activations.

On the 256x256 example at 0.5 bpp (4096 pixels a step) forward and backward took 8.7 instead of 10.9 ms on one
thread and 7.1 instead of 9.0 ms on two (2-core AMD EPYC VM, interleaved runs); with fit.py's leaner gradient
clipping and optim.py's one-stack Muon, whole encodes of 256x256 crops took 0.80 / 0.80 / 0.90x the time at 0.3 / 0.6 / 1.0 bpp
(benchmarks/NOTES.md #105). The wide networks of full-size images gain nothing: at 768x512 a step took 0.91x / 1.02x (0.3 bpp) and
1.01x / 1.09x (1.0 bpp) the time on one / two threads, medians of interleaved chunks on a noisy VM.
tests/test_subgrid.py checks values and gradients against model.NIF.
"""

from __future__ import annotations

import torch

from .bitstream import Architecture
from .model import axis_columns, encode_axis, sin_of_product


def padded_axis_encoding(t: torch.Tensor, freqs: int, scale: float, axis: int) -> torch.Tensor:
    """The positional encoding's columns for one axis (0: y, 1: x) of coordinates t, zero elsewhere: (len(t), pe_dim).

    encode(y, x) = padded(y, axis 0) + padded(x, axis 1), so W @ encode splits into a row and a column term.
    """
    enc = encode_axis(t, freqs, scale)
    cols = axis_columns(freqs, t.device)[axis]
    out = torch.zeros(len(t), 2 * enc.shape[1], device=t.device, dtype=t.dtype)
    out[:, cols] = enc
    return out


def as_slice(r: range) -> slice:
    """The rows (or columns) of a sample, fit.Fitter.sample's ranges, as a slice: a view, not a gather."""
    return slice(r.start, r.stop, r.step)


class SubgridNetwork:
    """NIF.forward_grid of one architecture over sub-grids of an h x w image, feature-major.

    `forward(tensors, rows, cols)` takes the network's tensors by name (NIF.named_tensors, or substitutes such
    as fake-quantised ones, which gradients flow through) and row and column index ranges; it returns
    (channels, len(rows) * len(cols)), pixels row-major.
    """

    def __init__(self, arch: Architecture, h: int, w: int, device, dtype=torch.float32):
        from .fit import pixel_axes

        self.arch = arch
        ys, xs = (t.to(dtype) for t in pixel_axes(h, w, range(h), range(w), device))

        def both(freqs):
            return (padded_axis_encoding(ys, freqs, arch.pe_scale, 0), padded_axis_encoding(xs, freqs, arch.pe_scale, 1))

        self.genesis_axes = both(arch.pe_freqs)
        self.modulation_axes = both(arch.mod_freqs) if arch.mod_widths else None

    def forward(self, t: dict, rows: range, cols: range) -> torch.Tensor:
        a = self.arch
        rows, cols = as_slice(rows), as_slice(cols)

        def linear(prefix, i, h, scale=1.0):  # scale * (W h + b)
            w, b = t[f"{prefix}.{i}.weight"], t[f"{prefix}.{i}.bias"][:, None]
            return torch.addmm(b, w, h, beta=scale, alpha=scale)

        def first(prefix, axes, scale=1.0):  # scale * (W encode + b) on the grid rows x cols
            ey, ex = axes
            ry = linear(prefix, 0, ey[rows].T, scale)
            rx = torch.mm(t[f"{prefix}.0.weight"], ex[cols].T)
            if scale != 1.0:
                rx = rx * scale
            return (ry[:, :, None] + rx[:, None, :]).reshape(ry.shape[0], -1)

        def sine(z_of, period):  # sin(period * z): a constant period rides on the matmul instead
            if isinstance(period, torch.Tensor):
                return sin_of_product(z_of(1.0), period, dim=0)
            return torch.sin(z_of(period))

        if a.mod_widths:
            n = len(a.mod_widths)
            h = sine(lambda s: first("modulation", self.modulation_axes, s), a.mod_omega)
            for i in range(1, n):
                h = sine(lambda s: linear("modulation", i, h, s), a.mod_omega)  # noqa: B023 (called at once)
            period = linear("modulation", n, h, a.mod_sigma) + a.omega  # (1, pixels)
        else:
            period = a.omega
        n = len(a.widths)
        h = sine(lambda s: first("genesis", self.genesis_axes, s), period)
        for i in range(1, n):
            h = sine(lambda s: linear("genesis", i, h, s), period)  # noqa: B023 (called at once)
        return linear("genesis", n, h)
