"""Fused Triton decoder: one kernel evaluates a whole FoldedNetwork for a tile of pixels.

Reference: ``to_pixels(evaluate_folded(net, pixel_grid(...)))`` in pillow_nif.model. Eager torch writes and
re-reads every hidden activation (addmm, multiply by the period, sine: ~4 passes of 4 bytes per unit), so
widths [360, 150, 70, 32] move ~10 KB per pixel for ~88 K multiply-adds. Fused, a pixel costs only its C
output bytes: coordinates are made from the pixel index, activations stay in registers and the weights
(a few hundred KB) are re-read from L2 by each tile.

Design
- A program decodes BLOCK_M consecutive pixels of the band (a 1D grid over the band's pixels).
- An activation is a tuple of register tiles BLOCK_M x 32 (the last one x 16 when that suffices), so widths
  pad to a multiple of 16 rather than to a power of two, and every tl.dot has K, N in {16, 32} (>= 16 as
  the GPU needs).
- A layer too wide to hold whole (padded width > WHOLE_MAX) is *streamed*: a loop computes CHUNK of its
  outputs, applies the sine and accumulates them at once into the next layer, so it never exists whole.
  A tiny search over which layers to stream minimises padded multiply-adds under that register bound.
- Sines inline CUDA sinf's fast path (<= 1.5 ulp; cos is one more quadrant) when pack proves every argument
  below 1e5, else tl.sin, whose inlined slow path would otherwise be a third of the code.
- The layer structure is a tuple of tl.constexpr descriptors, unrolled with tl.static_range: one kernel is
  compiled per architecture, for any depth (sm_90: ~5-30 s; Triton caches it on disk). Each descriptor is a flat
  tuple of ints, and functions get the whole tuple and an index: Triton 3.6's compiler takes tuples two deep
  only, and no inner tuple as an argument (3.9 and the interpreter take both). Weights are packed
  once per device into one zero-padded float32 buffer, cached on the FoldedNetwork.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from pillow_nif.model import FoldedNetwork

CHUNK = 32  # register-tile width, and columns per step of a streamed layer
# GPU defaults, chosen from sm_90 compiles of the benchmark models (cuobjdump): the fewest register spills.
# Not yet timed on a GPU: benchmarks/decode_speed.py --tune compares the alternatives.
WHOLE_MAX = 128  # widest activation held whole in registers; wider layers are streamed
BLOCK_M = 32  # pixels per program (tl.dot M); lowered when an activation must exceed WHOLE_MAX
NUM_WARPS = 8
INTERPRET_BLOCK_M = 512  # the interpreter's cost is per operation, so it wants few, large tiles

# Layer descriptor: (w_off, b_off, n_pad, in_n, in_16, out_n, out_16, mode, act, n_chunks). An activation is n tiles
# (_pieces): tile p starts at p * CHUNK and is CHUNK wide, but 16 where p is the last and the flag _16 is set.
WHOLE, STREAM, FUSED = 0, 1, 2  # FUSED: the layer after a STREAM one, evaluated inside its loop
ACT_NONE, ACT_PERIOD, ACT_SINE = 0, 1, 2  # output layer | genesis: sin(period * z) | modulation: sin(z)


# ---- kernel ---------------------------------------------------------------------------------------------


@triton.jit
def _sin_quadrant(x, shift):
    """sin(x + shift * pi / 2) for |x| < 105615, shift 0 or 1 (cos: one more quadrant, never adding pi / 2 in
    floating point). CUDA sinf's fast path (Cody-Waite reduction, its minimax polynomials; <= 1.5 ulp)
    without the Payne-Hanek slow path that tl.sin inlines for every element (a quarter to a third of the
    kernel's code) and its branch."""
    j = tl.floor(x * 0.636619747 + 0.5)  # nearest quadrant
    r = tl.fma(j, -1.57079601e00, x)
    r = tl.fma(j, -3.13916473e-07, r)
    r = tl.fma(j, -5.39030253e-15, r)
    s = r * r
    ps = tl.fma(tl.fma(tl.fma(s, -1.95152959e-4, 8.33216087e-3), s, -1.66666546e-1) * s, r, r)
    pc = tl.fma(tl.fma(tl.fma(tl.fma(s, 2.44331571e-5, -1.38873163e-3), s, 4.16666457e-2), s, -0.5), s, 1.0)
    q = j.to(tl.int32) + shift
    v = tl.where((q & 1) != 0, pc, ps)
    return tl.where((q & 2) != 0, -v, v)


@triton.jit
def _sin(x, FAST: tl.constexpr):
    """FAST only where pack proved every argument below 1e5."""
    if FAST:
        x = _sin_quadrant(x, 0)
    else:
        x = tl.sin(x)
    return x


@triton.jit
def _encode(y, x, freq_ptr, OFF: tl.constexpr, SIZE: tl.constexpr, FREQS: tl.constexpr, FAST: tl.constexpr):
    """Columns [OFF, OFF + SIZE) of encode_positions([y, x]), zero past its 2 + 4 FREQS columns."""
    col = OFF + tl.arange(0, SIZE)[None, :]
    j = tl.maximum(col - 2, 0)  # per frequency: sin y, cos y, sin x, cos x
    f = tl.load(freq_ptr + j // 4, mask=(col >= 2) & (col < 2 + 4 * FREQS), other=0.0)
    coord = tl.where((col == 1) | ((col >= 2) & ((j // 2) % 2 == 1)), x[:, None], y[:, None])
    ang = coord * f  # one f32 multiply, as the reference: huge angles round identically
    if FAST:
        enc = _sin_quadrant(ang, j % 2)
    else:
        enc = tl.where(j % 2 == 0, tl.sin(ang), tl.cos(ang))
    enc = tl.where(col < 2, coord, enc)
    return tl.where(col < 2 + 4 * FREQS, enc, 0.0)


@triton.jit
def _act(z, period, ACT: tl.constexpr, FAST: tl.constexpr):
    if ACT == 1:
        z = _sin(period[:, None] * z, FAST)
    elif ACT == 2:
        z = _sin(z, FAST)
    return z


@triton.jit
def _tile(ptr, row0, ROWS: tl.constexpr, col0, COLS: tl.constexpr, STRIDE: tl.constexpr):
    """Block [row0 : row0 + ROWS, col0 : col0 + COLS] of a row-major matrix with STRIDE columns."""
    r = row0 + tl.arange(0, ROWS)
    c = col0 + tl.arange(0, COLS)
    return tl.load(ptr + r[:, None] * STRIDE + c[None, :])


@triton.jit
def _whole(
    hs, period, buf, LAYERS: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr,
    FAST: tl.constexpr,
):  # fmt: skip
    """Layer I, input and output held whole as tuples of tiles. (Tile widths are spelt out, CHUNK = 32: a
    constexpr cannot be reassigned in an unrolled loop.)"""
    L: tl.constexpr = LAYERS[I]
    N_IN: tl.constexpr = L[3]  # (Triton 3.6: an element of a constexpr tuple is no constexpr until named one)
    N_OUT: tl.constexpr = L[5]
    out = ()
    for q in tl.static_range(N_OUT):
        acc = tl.zeros((BLOCK_M, 32 - 16 * L[6] * (q == L[5] - 1)), tl.float32)
        for p in tl.static_range(N_IN):
            w = _tile(
                buf + L[0], p * 32, 32 - 16 * L[4] * (p == L[3] - 1), q * 32, 32 - 16 * L[6] * (q == L[5] - 1), L[2]
            )
            acc = tl.dot(hs[p], w, acc, input_precision=PREC)
        b = tl.load(buf + L[1] + q * 32 + tl.arange(0, 32 - 16 * L[6] * (q == L[5] - 1)))
        out = out + (_act(acc + b[None, :], period, L[8], FAST),)
    return out


@triton.jit
def _streamed(
    hs, period, buf, LAYERS: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr,
    FAST: tl.constexpr,
):  # fmt: skip
    """Layer A = I in CHUNK-column steps, each accumulated at once into layer B = I + 1: A's output is never
    whole."""
    A: tl.constexpr = LAYERS[I]
    B: tl.constexpr = LAYERS[I + 1]
    CH: tl.constexpr = A[2] // A[9]
    N_IN: tl.constexpr = A[3]
    N_OUT: tl.constexpr = B[5]
    accs = ()
    for q in tl.static_range(N_OUT):
        accs = accs + (tl.zeros((BLOCK_M, 32 - 16 * B[6] * (q == B[5] - 1)), tl.float32),)
    for c in range(A[9]):
        c0 = c * CH
        z = tl.zeros((BLOCK_M, CH), tl.float32)
        for p in tl.static_range(N_IN):
            w = _tile(buf + A[0], p * 32, 32 - 16 * A[4] * (p == A[3] - 1), c0, CH, A[2])
            z = tl.dot(hs[p], w, z, input_precision=PREC)
        a = _act(z + tl.load(buf + A[1] + c0 + tl.arange(0, CH))[None, :], period, A[8], FAST)
        new = ()
        for q in tl.static_range(N_OUT):
            w = _tile(buf + B[0], c0, CH, q * 32, 32 - 16 * B[6] * (q == B[5] - 1), B[2])
            new = new + (tl.dot(a, w, accs[q], input_precision=PREC),)
        accs = new
    out = ()
    for q in tl.static_range(N_OUT):
        b = tl.load(buf + B[1] + q * 32 + tl.arange(0, 32 - 16 * B[6] * (q == B[5] - 1)))
        out = out + (_act(accs[q] + b[None, :], period, B[8], FAST),)
    return out


@triton.jit
def _mlp(
    y, x, period, buf,
    FREQS: tl.constexpr, LAYERS: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """Encode (y, x), run the layers; returns the output layer's tiles."""
    N_IN: tl.constexpr = LAYERS[0][3]
    hs = ()
    for p in tl.static_range(N_IN):
        hs = hs + (_encode(y, x, buf, p * 32, 32 - 16 * LAYERS[0][4] * (p == LAYERS[0][3] - 1), FREQS, FAST),)
    for i in tl.static_range(len(LAYERS)):
        if LAYERS[i][7] == 0:
            hs = _whole(hs, period, buf, LAYERS, i, BLOCK_M, PREC, FAST)
        elif LAYERS[i][7] == 1:
            hs = _streamed(hs, period, buf, LAYERS, i, BLOCK_M, PREC, FAST)
    return hs


@triton.jit
def _coordinate(i, size, stored, lo, span):
    """Network coordinate of the centre of output pixel i (of `size`) in float64, rounded to float32, with the
    operations of render._tile_coordinates: ((i + 1/2) * stored / size - lo) * 2 / span - 1. For a whole image
    (stored = span = size, lo = 0) every step but the last two is exact, so it is pixel_grid's (2i + 1) / size - 1
    to the bit. (int scalars equal to 1 arrive as constexprs, hence no .to() on them.)"""
    c = (i.to(tl.float64) + 0.5) * stored / size
    return (2.0 * (c - lo) / span - 1.0).to(tl.float32)


# Not specialised on its integers: Triton compiles a kernel for each pattern of them that are multiples of 16 or 1,
# and a large image's bands (row0 0, 699, 1398, ...), a last band's n_pix and a tile's offsets would each compile
# anew, 5-30 s a compile on sm_90. The code takes 1 either way (no .to() on them).
@triton.jit(do_not_specialize=["n_pix", "n_cols", "row0", "col0", "height", "y_stored", "y_lo", "y_span", "width",
                               "x_stored", "x_lo", "x_span"])
def _nif_decode_kernel(
    out_ptr,  # (n_pix, CHANNELS) uint8 or int32 pixels of the band, row-major (float32 values when not ROUND)
    buf,  # packed float32: frequency table at 0, then every padded weight and bias
    n_pix,  # pixels in this launch: rows * n_cols
    n_cols,  # columns in this launch
    row0,  # its first output row and column
    col0,
    height,  # per axis: the output's size, and the extent [lo, lo + span) of the stored axis, of `stored` pixels,
    y_stored,  # that the network's coordinates [-1, 1] span: the stored size, 0 and the stored size for a whole
    y_lo,  # image; a tile's extent for one tile of a tiled file (render.render_tiled)
    y_span,
    width,
    x_stored,
    x_lo,
    x_span,
    omega,  # the constant period when there is no modulation network
    maxval,  # clamp bound: 255 or 65535
    CHANNELS: tl.constexpr,
    GEN_FREQS: tl.constexpr,  # positional-encoding frequencies of the genesis / modulation networks
    MOD_FREQS: tl.constexpr,
    GEN: tl.constexpr,  # layer descriptors (see the module constants); MOD is () without modulation
    MOD: tl.constexpr,
    FAST_SIN: tl.constexpr,  # every sine argument (encoding, hidden layers) is below 1e5 in magnitude
    BLOCK_M: tl.constexpr,
    PREC: tl.constexpr,  # tl.dot input_precision: "ieee" (exact fp32) or "tf32x3"
    ROUND: tl.constexpr = True,  # False: the clamped values, for the post-filter (render.py)
):
    p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    y = _coordinate(row0 + p // n_cols, height, y_stored, y_lo, y_span)
    x = _coordinate(col0 + p % n_cols, width, x_stored, x_lo, x_span)
    if len(MOD) > 0:
        hm = _mlp(y, x, y, buf, MOD_FREQS, MOD, BLOCK_M, PREC, FAST_SIN)  # `y` stands in for the unused period
        period = tl.sum(hm[0], axis=1)  # the last layer has one real column, the padding is exactly 0
    else:
        period = tl.zeros((BLOCK_M,), tl.float32) + omega
    v = _mlp(y, x, period, buf, GEN_FREQS, GEN, BLOCK_M, PREC, FAST_SIN)[0]
    v = tl.minimum(tl.maximum(v, 0.0), maxval)
    if ROUND:
        v = tl.floor(v + 0.5)  # round half up, as to_pixels
    c = tl.arange(0, v.shape[1])
    offs = p.to(tl.int64)[:, None] * CHANNELS + c[None, :]
    mask = (p < n_pix)[:, None] & (c < CHANNELS)[None, :]
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


# ---- host side: packing and launch ----------------------------------------------------------------------


def _pieces(d: int) -> tuple[tuple[int, int], ...]:
    """Register tiles (offset, size) covering d columns: CHUNK wide, the last 16 wide when that suffices."""
    n, rem = divmod(d, CHUNK)
    sizes = [CHUNK] * n + ([16] if 0 < rem <= 16 else [CHUNK] if rem else [])
    return tuple(zip(itertools.accumulate([0, *sizes[:-1]]), sizes))


def _padded(d: int) -> int:
    return sum(s for _, s in _pieces(d))


def _plan(dims: list[int]) -> list[bool]:
    """Which layers to stream (never two in a row, never the last): fewest padded multiply-adds among the
    plans whose whole activations fit WHOLE_MAX, else among those that exceed it least."""
    n = len(dims) - 1
    best = None
    for mask in range(1 << (n - 1)):
        if mask & (mask >> 1):
            continue
        stream = [bool(mask >> i & 1) for i in range(n)]
        widths = [_padded(dims[0])] + [-(-d // CHUNK) * CHUNK if s else _padded(d) for d, s in zip(dims[1:], stream)]
        macs = sum(a * b for a, b in zip(widths, widths[1:]))
        excess = sum(max(0, w - WHOLE_MAX) for w, s in zip(widths, [False, *stream]) if not s)
        key = (excess, macs, sum(stream))
        if best is None or key < best[0]:
            best = (key, stream)
    return best[1]


@dataclasses.dataclass(frozen=True)
class _Packed:
    buf: torch.Tensor
    gen: tuple
    mod: tuple
    freqs: tuple[int, int]
    widest: int  # widest activation held whole
    macs: int  # padded multiply-adds per pixel (what the kernel computes)
    fast_sin: bool  # every sine argument provably within _sin's fast range


def _pack_layers(layers, in_dim, hidden_act, parts, offset):
    """Append the zero-padded weights of one network to parts; return its descriptors and new offset."""
    dims = [in_dim] + [w.shape[1] for w, _ in layers]
    stream = _plan(dims)
    pieces, k_pad, descs = _pieces(in_dim), _padded(in_dim), []
    for i, (w, b) in enumerate(layers):
        out = () if stream[i] else _pieces(dims[i + 1])
        n_pad = -(-dims[i + 1] // CHUNK) * CHUNK if stream[i] else _padded(dims[i + 1])
        wp = w.new_zeros(k_pad, n_pad)
        wp[: dims[i], : dims[i + 1]] = w
        bp = b.new_zeros(n_pad)
        bp[: dims[i + 1]] = b
        mode = STREAM if stream[i] else FUSED if i and stream[i - 1] else WHOLE
        act = ACT_NONE if i == len(layers) - 1 else hidden_act
        descs.append((offset, offset + wp.numel(), n_pad, *_tiles(pieces), *_tiles(out), mode, act,
                      n_pad // CHUNK if stream[i] else 0))
        parts += [wp.reshape(-1), bp]
        offset += wp.numel() + n_pad
        pieces, k_pad = out, n_pad
    return tuple(descs), offset


def _tiles(pieces) -> tuple[int, int]:
    """(n, 16): how the kernel spells pieces (see the descriptor's comment), which it can only if every tile but
    the last is CHUNK = 32 wide (the width its functions spell out) and they follow one another."""
    assert CHUNK == 32 and all(p == (i * CHUNK, CHUNK) for i, p in enumerate(pieces[:-1])), pieces
    return len(pieces), int(bool(pieces) and pieces[-1][1] == 16)


def _describe(descs) -> tuple[int, int]:
    first = descs[0][3] * CHUNK - 16 * descs[0][4]  # the padded encoding
    widest = max([first] + [d[2] for d in descs if d[7] != STREAM])
    macs = sum(descs[i - 1][2] * d[2] if i else first * d[2] for i, d in enumerate(descs))
    return widest, macs


def _max_sine_arg(net: FoldedNetwork, freqs: torch.Tensor) -> float:
    """A bound on |argument| of every sine: coordinates, encodings and sines all lie in [-1, 1]."""
    bound = lambda w, b: (w.double().abs().sum(0) + b.double().abs()).max().item()  # noqa: E731
    period = bound(*net.mod[-1]) if net.mod else abs(net.omega)
    args = [bound(w, b) for w, b in net.mod[:-1]] + [period * bound(w, b) for w, b in net.genesis]
    return max(args + freqs.abs().tolist())


def pack(net: FoldedNetwork) -> _Packed:
    """The padded weights and kernel descriptors of net, built once per device and cached on net."""
    dev = net.out[0].device
    cache = net.__dict__.setdefault("_triton_decode", {})
    if str(dev) in cache:
        return cache[str(dev)]
    if net.channels > 16:
        raise ValueError(f"at most 16 channels, not {net.channels}")
    nf = max(net.pe_freqs, net.mod_pe_freqs if net.mod else 0)
    # The same float64 expression as encode_positions, then float32.
    freqs = (math.pi * net.pe_scale ** torch.arange(nf, device=dev, dtype=torch.float64)).float()
    parts = [freqs, freqs.new_zeros(-nf % 16)]  # keep weights 64-byte aligned
    offset = nf + (-nf % 16)
    mod = ()
    if net.mod:
        mod, offset = _pack_layers(net.mod, 2 + 4 * net.mod_pe_freqs, ACT_SINE, parts, offset)
    gen, offset = _pack_layers([*net.genesis, net.out], 2 + 4 * net.pe_freqs, ACT_PERIOD, parts, offset)
    buf = torch.cat([t.float() for t in parts]).contiguous()
    widest, macs = _describe(gen)
    if mod:
        mw, mm = _describe(mod)
        widest, macs = max(widest, mw), macs + mm
    packed = _Packed(buf, gen, mod, (net.pe_freqs, net.mod_pe_freqs), widest, macs, _max_sine_arg(net, freqs) < 1e5)
    cache[str(dev)] = packed
    return packed


def gpu_block_m(pk: _Packed) -> int:
    """Pixels per program on a GPU: BLOCK_M, shrunk (to a power of two) when some activation must be held whole
    beyond WHOLE_MAX, to bound registers."""
    block_m = max(16, min(BLOCK_M, BLOCK_M * WHOLE_MAX // pk.widest))
    return 1 << (block_m.bit_length() - 1)


def _interpreting() -> bool:
    return isinstance(_nif_decode_kernel, InterpretedFunction)


def render_band(
    net: FoldedNetwork,
    width: int,
    height: int,
    row0: int,
    row1: int,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    num_warps: int = NUM_WARPS,
    precision: str = "ieee",
    raw: bool = False,
    cols: range | None = None,
    tile: tuple[int, int, tuple[int, int, int, int]] | None = None,
) -> torch.Tensor:
    """Rows [row0, row1) of the (height, width) decode of net: (row1 - row0, len(cols), C) integer pixels.

    uint8 when net.maxval == 255, else int32; equal (up to float32 rounding) to
    to_pixels(evaluate_folded(net, pixel_grid(width, height, slice(row0, row1)))). Runs on the device of
    net's weights (CUDA, or CPU under TRITON_INTERPRET=1). `out`, if given, is filled and returned. With `raw`:
    float32 values clamped to [0, maxval], not rounded (what the post-filter reads).

    `cols`: only those columns (a range in [0, width)). `tile` = (stored width, stored height, (x0, y0, x1, y1)):
    net is one tile of a tiled file, fitted to that extent of the stored image, and the (height, width) output is
    the whole image at another size: each pixel is evaluated at its centre's coordinates in the tile's extent, as
    render.tile_pixels_at does with torch.
    """
    cols = range(width) if cols is None else cols
    if width < 1 or height < 1 or not 0 <= row0 <= row1 <= height:
        raise ValueError(f"rows [{row0}, {row1}) of a {width}x{height} image")
    if cols.step != 1 or not 0 <= cols.start <= cols.stop <= width:
        raise ValueError(f"columns {cols} of a {width}x{height} image")
    sw, sh, (x0, y0, x1, y1) = tile if tile is not None else (width, height, (0, 0, width, height))
    if not (0 <= x0 < x1 <= sw and 0 <= y0 < y1 <= sh):
        raise ValueError(f"tile extent {(x0, y0, x1, y1)} of a {sw}x{sh} image")
    dev = net.out[0].device
    if dev.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton decoder needs CUDA weights (or TRITON_INTERPRET=1 for CPU)")
    dtype = torch.float32 if raw else torch.uint8 if net.maxval == 255 else torch.int32
    shape = (row1 - row0, len(cols), net.channels)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=dev)
    elif out.shape != shape or out.dtype != dtype or out.device != dev or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape} on {dev}")
    if out.numel() == 0:
        return out
    pk = pack(net)
    if block_m is None:
        # Shrink the tile when some activation must be held whole beyond WHOLE_MAX, to bound registers.
        block_m = INTERPRET_BLOCK_M if _interpreting() else gpu_block_m(pk)
    # Pixel indices are int32 in the kernel: split bands of more than 2**31 pixels.
    step = max(1, (2**31 - 1 - block_m) // len(cols))
    for r in range(row0, row1, step):
        r1 = min(row1, r + step)
        n = (r1 - r) * len(cols)
        _nif_decode_kernel[(triton.cdiv(n, block_m),)](
            out[r - row0 : r1 - row0], pk.buf, n, len(cols), r, cols.start, height, sh, y0, y1 - y0, width, sw, x0,
            x1 - x0, float(net.omega), float(net.maxval),
            CHANNELS=net.channels, GEN_FREQS=pk.freqs[0], MOD_FREQS=pk.freqs[1], GEN=pk.gen, MOD=pk.mod,
            FAST_SIN=pk.fast_sin, BLOCK_M=block_m, PREC=precision, ROUND=not raw, num_warps=num_warps,
        )  # fmt: skip
    return out
