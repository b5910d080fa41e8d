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
- The backward is written out (SubgridNetwork.gradients, one autograd.Function for the whole network): autograd's
  graph of the network's small operations costs per operation, whatever the pixel count (forward and backward
  took 3.0 ms over 1024 pixels and 6.1 ms over 4096 on the 0.5 bpp example), and the written-out chain rule
  needs fewer activation-sized temporaries. Against autograd over the same forward,
  interleaved 50-step chunks of the whole training loop took 0.91x (0.5 bpp example, two threads; 0.93x on one),
  0.97x (0.3 bpp, plain network) and 0.92x (1.0 bpp) the time, and 0.98x / 0.94x at 768x512 (0.3 / 1.0 bpp);
  whole encodes of 8 crops 1.01 / 0.93 / 0.93x at 0.3 / 0.6 / 1.0 bpp (benchmarks/NOTES.md #106).

On the 256x256 example at 0.5 bpp (4096 pixels a step) forward and backward took 8.7 instead of 10.9 ms on one
thread and 7.1 instead of 9.0 ms on two (2-core AMD EPYC VM, interleaved runs); with fit.py's leaner gradient
clipping and optim.py's one-stack Muon, whole encodes of 256x256 crops took 0.80 / 0.80 / 0.90x the time at 0.3 / 0.6 / 1.0 bpp
(benchmarks/NOTES.md #105). The wide networks of full-size images gained nothing from the layout: at 768x512 a step took
0.91x / 1.02x (0.3 bpp) and 1.01x / 1.09x (1.0 bpp) the time on one / two threads, medians of interleaved chunks on a
noisy VM. tests/test_subgrid.py checks values and gradients against model.NIF.
"""

from __future__ import annotations

import torch

from .bitstream import Architecture
from .model import axis_columns, encode_axis


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


def _linear(w, b, h, scale=1.0):
    """scale * (w @ h + b), h feature-major."""
    return torch.addmm(b[:, None], w, h, beta=scale, alpha=scale)


def _first(w, b, axes, rows, cols, scale=1.0):
    """scale * (w @ encode + b) on the grid rows x cols: a row term and a column term, broadcast. A drawn sample
    (sampling.py: cols (R, K), each row its own columns) takes its column terms from every column's."""
    ey, ex = axes
    ry = _linear(w, b, ey[rows].T, scale)
    drawn = isinstance(cols, torch.Tensor)
    rx = torch.mm(w, ex.T if drawn else ex[cols].T)
    if scale != 1.0:
        rx.mul_(scale)
    if drawn:
        z = rx.index_select(1, cols.reshape(-1)).view(ry.shape[0], *cols.shape)
        return z.add_(ry[:, :, None]).view(ry.shape[0], -1)
    return (ry[:, :, None] + rx[:, None, :]).reshape(ry.shape[0], -1)


class SubgridNetwork:
    """NIF.forward_grid of one architecture over sub-grids of an h x w image, feature-major.

    `forward(tensors, rows, cols)` takes the network's tensors by name (NIF.named_tensors, or substitutes such
    as fake-quantised ones, which gradients flow through) and row and column index ranges, or a drawn sample
    (sampling.py: row indices (R,) and each row's column indices (R, K)); it returns (channels, R * K), pixels
    row-major. `run` and `gradients` are its forward and backward.
    """

    def __init__(self, arch: Architecture, h: int, w: int, device, dtype=torch.float32):
        from .fit import pixel_axes

        self.arch = arch
        self.names = [n for n, _ in arch.tensor_shapes()]
        ys, xs = (t.to(dtype) for t in pixel_axes(h, w, range(h), range(w), device))

        def both(freqs):
            return (padded_axis_encoding(ys, freqs, arch.pe_scale, 0), padded_axis_encoding(xs, freqs, arch.pe_scale, 1))

        self.genesis_axes = both(arch.pe_freqs)
        self.modulation_axes = both(arch.mod_freqs) if arch.mod_widths else None

    def forward(self, t: dict, rows, cols) -> torch.Tensor:
        if isinstance(rows, range):
            rows, cols = as_slice(rows), as_slice(cols)
        return _Subgrid.apply(self, rows, cols, *(t[n] for n in self.names))

    def _split(self, ws):
        """The genesis and the modulation network's (weight, bias) pairs, from tensors in bitstream order."""
        pairs = list(zip(ws[0::2], ws[1::2]))
        n = len(self.arch.widths) + 1
        return pairs[:n], pairs[n:]

    def run(self, ws, rows: slice, cols: slice) -> tuple[torch.Tensor, list, list]:
        """The output and, per network (genesis, modulation), what its gradients need (see _sines)."""
        a = self.arch
        genesis, modulation = self._split(ws)
        period, msaved = a.omega, []
        if modulation:
            h = _sines(modulation, self.modulation_axes, a.mod_omega, rows, cols, msaved)
            period = _linear(*modulation[-1], h, a.mod_sigma).add_(a.omega)  # (1, pixels)
        gsaved = [period if isinstance(period, torch.Tensor) else None]
        out = _linear(*genesis[-1], _sines(genesis, self.genesis_axes, period, rows, cols, gsaved))
        return out, gsaved, msaved

    def gradients(self, ws, rows: slice, cols: slice, gsaved, msaved, grad) -> list[torch.Tensor]:
        """Every tensor's gradient, in bitstream order, from the output's: the chain rule through `run`."""
        a = self.arch
        genesis, modulation = self._split(ws)
        period, *gsaved = gsaved
        period = a.omega if period is None else period
        grads, dperiod = _sine_gradients(genesis, self.genesis_axes, period, rows, cols, gsaved, grad)
        if modulation:  # period = omega + sigma * (the modulation's output)
            dperiod.mul_(a.mod_sigma)
            grads += _sine_gradients(modulation, self.modulation_axes, a.mod_omega, rows, cols, msaved, dperiod)[0]
        return grads


def _sines(layers, axes, period, rows, cols, saved: list) -> torch.Tensor:
    """The sine layers of one network (all its layers but the output); returns the output layer's input.

    `saved` gets, per layer, its input h (None for the first), its output u before the period (None where the
    period is a constant, which then rides on the matmul) and the sine's argument z; then the last h.
    """
    h = None
    for i, (w, b) in enumerate(layers[:-1]):
        if isinstance(period, torch.Tensor):
            u = _first(w, b, axes, rows, cols) if i == 0 else _linear(w, b, h)
            z = u * period
        else:
            u = None
            z = _first(w, b, axes, rows, cols, period) if i == 0 else _linear(w, b, h, period)
        saved += [h, u, z]
        h = torch.sin(z)
    saved.append(h)
    return h


def _sine_gradients(layers, axes, period, rows, cols, saved, grad) -> tuple[list, torch.Tensor | None]:
    """One network's (weight, bias) gradients in order, and its period's gradient (a tensor period only), from
    what _sines saved and `grad`, the gradient of the network's output."""
    w, _ = layers[-1]
    h = saved[-1]
    pairs = [(torch.mm(grad, h.T), grad.sum(1))]  # output layer first
    dperiod = None
    for i in range(len(layers) - 2, -1, -1):
        h, u, z = saved[3 * i : 3 * i + 3]
        dz = torch.cos(z).mul_(torch.mm(w.T, grad))
        if u is not None:  # z = u * period, per pixel
            d = torch.linalg.vecdot(dz, u, dim=0)[None]
            dperiod = d if dperiod is None else dperiod.add_(d)
        grad = dz.mul_(period)  # the gradient of u: z = period * u
        w, _ = layers[i]
        if i:
            pairs.append((torch.mm(grad, h.T), grad.sum(1)))
        elif isinstance(cols, torch.Tensor):  # the first layer of a drawn sample: rows summed, columns gathered
            gy = grad.view(grad.shape[0], *cols.shape).sum(2)
            dw = drawn_columns_gradient(grad, axes[1], cols.reshape(-1), scatter=not grad.is_cuda)
            pairs.append((dw.addmm_(gy, axes[0][rows]), gy.sum(1)))
        else:  # the first layer: a row term and a column term
            ey, ex = axes[0][rows], axes[1][cols]
            g = grad.view(grad.shape[0], len(ey), len(ex))
            gy, gx = g.sum(2), g.sum(1)
            pairs.append((torch.addmm(gy @ ey, gx, ex), gy.sum(1)))
    return [t for p in reversed(pairs) for t in p], dperiod


def drawn_columns_gradient(grad: torch.Tensor, ex: torch.Tensor, cols: torch.Tensor, scatter: bool) -> torch.Tensor:
    """The column term's share of the first layer's weight gradient, sum over pixels p of grad[:, p] ex[cols[p]]:
    each column's gradients summed into it, then one small product (`scatter`, the CPU's way: 2.7 ms against 6.0
    for the product over pixels at 768x512, 1.0 bpp, one thread), or the product over the pixels' gathered
    encodings, since CUDA sums index_add_'s repeats with atomics, in an order that varies from run to run."""
    if scatter:
        return grad.new_zeros(grad.shape[0], len(ex)).index_add_(1, cols, grad) @ ex
    return grad @ ex.index_select(0, cols)


class _Subgrid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, net, rows, cols, *ws):
        out, gsaved, msaved = net.run(ws, rows, cols)
        ctx.net, ctx.rows, ctx.cols = net, rows, cols
        ctx.counts = len(ws), len(gsaved)
        ctx.save_for_backward(*ws, *gsaved, *msaved)
        return out

    @staticmethod
    def backward(ctx, grad):
        nw, ng = ctx.counts
        t = ctx.saved_tensors
        ws, gsaved, msaved = t[:nw], list(t[nw : nw + ng]), list(t[nw + ng :])
        return (None, None, None, *ctx.net.gradients(ws, ctx.rows, ctx.cols, gsaved, msaved, grad.contiguous()))
