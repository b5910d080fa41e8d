"""The NIF network (Catania & Allegra, 2023) in torch: the reference every fast path is tested against.

    coords (y, x) in [-1, 1]
      -> positional encoding  [y, x, sin(pi s^i y), cos(pi s^i y), sin(pi s^i x), cos(pi s^i x), ...]
      -> Genesis: sin(period * (W_0 e + b_0)) -> sin(period * (W_k h + b_k)) ... -> W_out h + b_out
    period(p) = omega + sigma * Modulation(p), Modulation = small SIREN on its own encoding of p.

Pixel (i, j) of an output of size (w, h) sits at its centre: y = (2 i + 1) / h - 1, x = (2 j + 1) / w - 1,
so the same network renders any size and a resized decode covers the same area.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import nn

from .bitstream import Architecture

# SIREN's hidden-layer initialisation constant (Sitzmann et al. 2020), as NIF uses it.
SIREN_C = 6.0


def pixel_grid(width: int, height: int, rows: slice | None = None, device=None, dtype=torch.float32):
    """(N, 2) tensor of (y, x) pixel-centre coordinates, row-major; `rows` picks a band of rows."""
    r0, r1 = (0, height) if rows is None else (rows.start, rows.stop)
    y = (2 * torch.arange(r0, r1, device=device, dtype=torch.float64) + 1) / height - 1
    x = (2 * torch.arange(width, device=device, dtype=torch.float64) + 1) / width - 1
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1).to(dtype)


def encode_positions(coords: torch.Tensor, freqs: int, scale: float) -> torch.Tensor:
    """NeRF-style encoding: [y, x] then, for each frequency i, sin/cos of pi * scale**i * y, then of x."""
    if freqs == 0:
        return coords
    f = math.pi * scale ** torch.arange(freqs, device=coords.device, dtype=torch.float64)
    ang = coords[:, None, :] * f.to(coords.dtype)[None, :, None]  # (N, F, 2)
    sc = torch.stack([torch.sin(ang), torch.cos(ang)], dim=-1)  # (N, F, 2, 2): [.., coord, sin|cos]
    return torch.cat([coords, sc.reshape(coords.shape[0], -1)], dim=1)


def encode_axis(t: torch.Tensor, freqs: int, scale: float) -> torch.Tensor:
    """Encoding of one coordinate axis: [t, sin(pi s^0 t), cos(pi s^0 t), sin(pi s^1 t), ...]."""
    if freqs == 0:
        return t[:, None]
    f = math.pi * scale ** torch.arange(freqs, device=t.device, dtype=torch.float64)
    ang = t[:, None] * f.to(t.dtype)[None, :]
    return torch.cat([t[:, None], torch.stack([torch.sin(ang), torch.cos(ang)], dim=-1).reshape(t.shape[0], -1)], 1)


def axis_columns(freqs: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of the positional encoding that depend on y, and those that depend on x."""
    i = torch.arange(freqs, device=device)
    # No torch.tensor([0], device=...): a copy from host memory, which a CUDA graph's capture refuses (stepgraph.py).
    zero = torch.zeros(1, dtype=i.dtype, device=device)
    ycols = torch.cat([zero, torch.stack([2 + 4 * i, 3 + 4 * i], 1).reshape(-1)])
    xcols = torch.cat([zero + 1, torch.stack([4 + 4 * i, 5 + 4 * i], 1).reshape(-1)])
    return ycols, xcols


def first_layer_grid(weight, bias, ys, xs, freqs: int, scale: float) -> torch.Tensor:
    """weight @ encode(y, x) + bias on the grid ys x xs, as (len(ys), len(xs), out).

    The encoding of (y, x) is the concatenation of a y-only and an x-only part, so the first layer
    splits into a per-row and a per-column matmul and a broadcast add: (H + W) rows of work
    instead of H * W for the widest layer with the largest fan-in. `weight` is (out, in).
    """
    ycols, xcols = axis_columns(freqs, weight.device)
    a = encode_axis(ys, freqs, scale) @ weight[:, ycols].T + bias
    b = encode_axis(xs, freqs, scale) @ weight[:, xcols].T
    return a[:, None, :] + b[None, :, :]


class _SinOfProduct(torch.autograd.Function):
    """sin(p * z) for a per-pixel period p (shape z.shape[:-1] + (1,)), with a leaner backward.

    Autograd's version allocates four activation-sized temporaries (cos, two products, one more for
    p's gradient); this one allocates one and reduces p's gradient with a dot product. On the CPU,
    where the sine layers are bound by passes over their activations, that made a 102 -> 51 layer's
    forward + backward 17 % faster (4096 pixels, one thread) and a whole training step 2-9 %.
    """

    generate_vmap_rule = True  # torch.func.vmap over a network (benchmarks/encode_speed.py's forward section)

    @staticmethod
    def forward(z, p):
        u = z * p
        return torch.sin(u), u  # u out too: setup_context (the form vmap needs) sees only inputs and outputs

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, p = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(z, output[1], p)

    @staticmethod
    def backward(ctx, grad, _):
        z, u, p = ctx.saved_tensors
        gu = torch.cos(u).mul_(grad)
        gp = torch.linalg.vecdot(gu, z).unsqueeze(-1) if ctx.needs_input_grad[1] else None
        return gu.mul_(p) if ctx.needs_input_grad[0] else None, gp


def sin_of_product(z: torch.Tensor, p) -> torch.Tensor:
    """sin(p * z): the genesis activation (p the period, a per-pixel tensor or a constant)."""
    if isinstance(p, torch.Tensor) and p.shape == z.shape[:-1] + (1,) and torch.is_grad_enabled():
        return _SinOfProduct.apply(z, p)[0]
    return torch.sin(p * z)


def _sin_of_product_(z: torch.Tensor, p) -> torch.Tensor:
    """sin(p * z) written over z, a temporary nothing else holds (evaluation without autograd: the encoder's
    MSE measurements, which run the network hundreds of times per encode), sparing two activation-sized
    allocations per layer; the values are the same bits as sin_of_product's."""
    return z.mul_(p).sin_()


def layer_index(arch: Architecture, name: str) -> int:
    """The position in grid_layers' order (the modulation's layers, then the genesis') of a tensor's layer."""
    net, i, _ = name.split(".")
    return int(i) + (len(arch.mod_widths) + 1 if arch.mod_widths and net == "genesis" else 0)


def grid_layers(arch: Architecture, p: dict, ys, xs, start: int = 0, h=None, period=None, inputs: list | None = None):
    """NIF.forward_grid with the tensors `p` (by name), from layer `start` on (layer_index's order), given that
    layer's input h and the period (None: omega, the period before the modulation's last layer); `inputs` gets
    each layer's (h, period) as it starts, so that a later call can start there (fit.allocate_steps)."""
    import torch.nn.functional as F

    a = arch
    act = sin_of_product if torch.is_grad_enabled() else _sin_of_product_  # every z below is a fresh temporary
    nm = len(a.mod_widths) + 1 if a.mod_widths else 0
    n = nm + len(a.widths) + 1
    period = a.omega if period is None else period
    for k in range(start, n):
        if inputs is not None:
            inputs.append((h, period))
        net, i, omega = ("modulation", k, a.mod_omega) if k < nm else ("genesis", k - nm, period)
        w, b = p[f"{net}.{i}.weight"], p[f"{net}.{i}.bias"]
        if k == nm - 1:  # the modulation's output is the period
            period, h = a.omega + a.mod_sigma * F.linear(h, w, b), None
        elif k == n - 1:
            h = F.linear(h, w, b)
        elif i == 0:
            h = act(first_layer_grid(w, b, ys, xs, a.mod_freqs if k < nm else a.pe_freqs, a.pe_scale), omega)
        else:
            h = act(F.linear(h, w, b), omega)
    return h


class _BlankLinear(nn.Linear):
    """nn.Linear whose construction draws nothing: its tensors are torch.empty's, for the caller to set."""

    def reset_parameters(self):
        pass


class NIF(nn.Module):
    """Genesis + Modulation networks built from an Architecture (trainable, unfolded parameters)."""

    def __init__(self, arch: Architecture, device=None, blank: bool = False):
        super().__init__()
        self.arch = arch
        lin = functools.partial(_BlankLinear if blank else nn.Linear, device=device)
        dims = [arch.pe_dim, *arch.widths, arch.channels]
        self.genesis = nn.ModuleList(lin(dims[i], dims[i + 1]) for i in range(len(dims) - 1))
        if arch.mod_widths:
            mdims = [arch.mod_pe_dim, *arch.mod_widths, 1]
            self.modulation = nn.ModuleList(lin(mdims[i], mdims[i + 1]) for i in range(len(mdims) - 1))
        else:
            self.modulation = nn.ModuleList()

    @torch.no_grad()
    def initialize(self, generator: torch.Generator | None = None):
        """SIREN initialisation: first layer U(-1/in, 1/in), later ones U(-sqrt(c/in)/omega, +)."""
        for layers, omega in ((self.genesis, self.arch.omega), (self.modulation, self.arch.mod_omega)):
            for i, lin in enumerate(layers):
                fan_in = lin.weight.shape[1]
                bound = 1 / fan_in if i == 0 else math.sqrt(SIREN_C / fan_in) / omega
                lin.weight.uniform_(-bound, bound, generator=generator)
                lin.bias.uniform_(-bound, bound, generator=generator)
        if len(self.modulation):
            # Start with no modulation, so training begins from a plain SIREN.
            self.modulation[-1].weight.mul_(0.1)
            self.modulation[-1].bias.zero_()
        return self

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Parameters in bitstream order (matches Architecture.tensor_shapes)."""
        out = []
        for prefix, layers in (("genesis", self.genesis), ("modulation", self.modulation)):
            for i, lin in enumerate(layers):
                out += [(f"{prefix}.{i}.weight", lin.weight), (f"{prefix}.{i}.bias", lin.bias)]
        return out

    def period(self, coords: torch.Tensor) -> torch.Tensor | float:
        a = self.arch
        if not len(self.modulation):
            return a.omega
        h = encode_positions(coords, a.mod_freqs, a.pe_scale)
        for lin in self.modulation[:-1]:
            h = torch.sin(a.mod_omega * lin(h))
        return a.omega + a.mod_sigma * self.modulation[-1](h)

    def forward_grid(self, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """The network on the grid ys x xs (1-D coordinate vectors): (len(ys), len(xs), channels)."""
        return grid_layers(self.arch, dict(self.named_tensors()), ys, xs)

    def forward(self, ys: torch.Tensor, xs: torch.Tensor, weights: dict[str, torch.Tensor] | None = None):
        """Grid evaluation; `weights` substitutes tensors (e.g. fake-quantised ones) by name."""
        if weights is not None:
            return torch.func.functional_call(self, weights, (ys, xs))
        return self.forward_grid(ys, xs)

    def forward_points(self, coords: torch.Tensor) -> torch.Tensor:
        """Network output (N, channels) at arbitrary (y, x) points: the plain reference maths."""
        a = self.arch
        period = self.period(coords)
        h = encode_positions(coords, a.pe_freqs, a.pe_scale)
        for lin in self.genesis[:-1]:
            h = torch.sin(period * lin(h))
        return self.genesis[-1](h)


def blank_nif(arch: Architecture, device="cpu") -> NIF:
    """A NIF whose tensors are uninitialised, for callers that set every one (a fit's initialize, a copy's
    weights), so that it draws nothing from torch's global RNG, which nn.Linear's own initialisation did on every
    encode, under the caller's feet. Not by way of the meta device: `to_empty` from there goes through torch's
    Python decompositions, whose first use imports sympy, 0.2 s of a fresh process."""
    return NIF(arch, device=device, blank=True)


# ---- decoding: constants folded into the weights -------------------------------------------------


@dataclasses.dataclass
class FoldedNetwork:
    """The network with every constant folded in, as the decoders (torch and Triton) evaluate it.

    mod[k] = (W, b): h = sin(W h + b) for all but the last, whose linear output *is* the period.
    genesis[k] = (W, b): h = sin(period * (W h + b)); out = (W, b): pixel = clamp(W h + b, 0, maxval),
    already in output units (colour transform and scaling folded in), rounded half up.
    Weights are (in, out) so that a row of pixels times W is one matmul.
    """

    pe_freqs: int
    pe_scale: float
    mod_pe_freqs: int
    omega: float
    mod: list[tuple[torch.Tensor, torch.Tensor]]
    genesis: list[tuple[torch.Tensor, torch.Tensor]]
    out: tuple[torch.Tensor, torch.Tensor]
    maxval: float
    # Versions 6-8: the post-filter (mix, taps, offset) of postfilter.py on the neighbours filter_dirs, one set of
    # coefficients per class of activity split at filter_thresholds (version 8), applied at the stored size only.
    filter: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    filter_dirs: tuple[tuple[int, int], ...] = ()
    filter_thresholds: tuple[float, ...] = ()

    @property
    def channels(self) -> int:
        return self.out[0].shape[1]

    def to(self, device) -> "FoldedNetwork":
        mv = lambda layers: [(w.to(device), b.to(device)) for w, b in layers]  # noqa: E731
        filt = None if self.filter is None else tuple(t.to(device) for t in self.filter)
        return dataclasses.replace(self, mod=mv(self.mod), genesis=mv(self.genesis), out=mv([self.out])[0], filter=filt)


def output_affine(channels: int, colour: int, maxval: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, c) with pixel = A @ net + c: undo the [-1, 1] normalisation and the colour transform."""
    from .colour import inverse_matrix

    m = torch.eye(channels, dtype=torch.float64)
    off = torch.zeros(channels, dtype=torch.float64)
    if colour:
        inv, inv_off = inverse_matrix(colour)
        m[:3, :3] = inv
        off[:3] = inv_off
    # net in [-1, 1] -> [0, 1] -> colour inverse -> [0, maxval]
    a = m * 0.5 * maxval
    c = (m @ torch.full((channels,), 0.5, dtype=torch.float64) + off) * maxval
    return a, c


def fold(model: NIF | Architecture, colour: int, maxval: float, weights: dict[str, torch.Tensor] | None = None
         ) -> FoldedNetwork:
    """Fold omega, sigma, the colour transform and the output scaling into the weights (float32): the model's, or
    `weights` by name (then `model` may be just the Architecture: a decoder builds no module)."""
    a = model if isinstance(model, Architecture) else model.arch
    w = {k: t.detach().double() for k, t in (weights or dict(model.named_tensors())).items()}
    mod = []
    for i in range(len(a.mod_widths) + (1 if a.mod_widths else 0)):
        W, b = w[f"modulation.{i}.weight"].T, w[f"modulation.{i}.bias"]
        last = i == len(a.mod_widths)
        s = a.mod_sigma if last else a.mod_omega
        mod.append((W * s, b * s + (a.omega if last else 0.0)))
    n = len(a.widths)
    genesis = [(w[f"genesis.{i}.weight"].T, w[f"genesis.{i}.bias"]) for i in range(n)]
    W, b = w[f"genesis.{n}.weight"].T, w[f"genesis.{n}.bias"]
    A, c = (t.to(W.device) for t in output_affine(a.channels, colour, maxval))  # float64 on the CPU
    out = (W @ A.T, b @ A.T + c)
    f32 = lambda layers: [(x.float().contiguous(), y.float().contiguous()) for x, y in layers]  # noqa: E731
    return FoldedNetwork(a.pe_freqs, a.pe_scale, a.mod_freqs, a.omega, f32(mod), f32(genesis), f32([out])[0], maxval)


def evaluate_folded(net: FoldedNetwork, coords: torch.Tensor) -> torch.Tensor:
    """Reference decode of (N, 2) coordinates to float pixel values in [0, maxval], not yet rounded."""
    if net.mod:
        h = encode_positions(coords, net.mod_pe_freqs, net.pe_scale)
        for W, b in net.mod[:-1]:
            h = torch.sin(torch.addmm(b, h, W))
        period = torch.addmm(net.mod[-1][1], h, net.mod[-1][0])
    else:
        period = net.omega
    h = encode_positions(coords, net.pe_freqs, net.pe_scale)
    for W, b in net.genesis:
        h = torch.sin(period * torch.addmm(b, h, W))
    return torch.addmm(net.out[1], h, net.out[0]).clamp_(0, net.maxval)


def evaluate_folded_grid(net: FoldedNetwork, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """evaluate_folded on the grid ys x xs, (len(ys) * len(xs), C), with the separable first layers."""
    def first(layer, freqs):
        W, b = layer
        return first_layer_grid(W.T, b, ys, xs, freqs, net.pe_scale).reshape(len(ys) * len(xs), -1)

    # In-place elementwise ops: on the CPU these layers are bound by memory traffic, not FLOPs.
    if net.mod:  # at least two layers: a modulation network has one hidden layer or more
        h = first(net.mod[0], net.mod_pe_freqs).sin_()
        for W, b in net.mod[1:-1]:
            h = torch.addmm(b, h, W).sin_()
        period = torch.addmm(net.mod[-1][1], h, net.mod[-1][0])
    else:
        period = net.omega
    h = first(net.genesis[0], net.pe_freqs).mul_(period).sin_()
    for W, b in net.genesis[1:]:
        h = torch.addmm(b, h, W).mul_(period).sin_()
    return torch.addmm(net.out[1], h, net.out[0]).clamp_(0, net.maxval)


def to_pixels(values: torch.Tensor) -> torch.Tensor:
    """Round half up (never floor) to integers."""
    return torch.floor(values + 0.5)
