"""Fused Triton training pass of a whole NIF network: two launches a step instead of ~60.

Reference: `pillow_nif.subgrid.SubgridNetwork` (what fit.Fitter trains with), whose forward and written-out backward
over a step's pixels this computes. Measured on an H200 (benchmarks/NOTES.md round 43), a training step of the
1.0 bpp network over 98k pixels took 5.6 ms in eager torch, ~13 % of the GPU's fp32 rate: the step is bound by its
launches (the modulation's and the genesis' layers, their sines, products and sums, one kernel each) and not by its
arithmetic. This does the network's part of a step in two kernels, for any architecture:

- `_forward_kernel`: per slab of BLOCK_P pixels, the positional encodings (gathered from the image's row and column
  tables, as SubgridNetwork has them), every modulation layer, the period, every genesis layer and the output,
  which it writes feature-major (channels, pixels), as SubgridNetwork returns it.
- `_backward_kernel`: per slab, the chain rule back through the same layers; each program sums its slabs' weight and
  bias gradients into its own row of a (programs, parameters) buffer, and one torch.sum over the rows finishes them:
  no atomics, so the gradients' summation order is fixed and a run repeats bit for bit.

Every layer's input, pre-activation and output stay in a scratch buffer of the slab's own (BLOCK_P x the
architecture's summed widths, pixel-major; L2-resident at a step's few thousand pixels) written by the forward and
read back by the backward, which writes each layer's gradients over them. Layers are rows of a small int table
(widths, offsets, kind) walked by a loop at run time, so one compiled kernel serves every architecture. Within a
program, a layer's stores are made visible to the threads that read them by a barrier (tl.debug_barrier).

Layer kinds: SINE_CONST h = sin(c u) (the modulation's hidden layers, and a plain network's genesis layers),
SINE_PERIOD h = sin(period u) (a modulated genesis), PERIOD period = omega + sigma u (the modulation's output),
LINEAR the genesis output; u = W h_in + b.

fp32 throughout, tl.dot with input_precision="ieee" (no TF32; "tf32" where fit.FitConfig.tf32 asks). Not yet timed
on a GPU (no GPU was lent since it was written): `benchmarks/encode_speed.py`'s step section compares it with the
torch step, eager and as CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SINE_CONST, SINE_PERIOD, PERIOD, LINEAR = 0, 1, 2, 3
DESC = 8  # layer table columns: K, M, w_off, b_off, src_off, u_off, h_off, kind (offsets into the packed weights /
# into a pixel's scratch row)
PRECISION = "ieee"
# (BLOCK_P, BLOCK_T): pixels per slab and the tile width of every matmul; the programs each take slabs in turn.
# GPU choice from sm_90 compiles (cuobjdump, the 1.0 bpp network; Triton 3.9 and 3.6 alike): 16-wide tiles at 4
# warps fit in registers (forward / backward 100 / 152 at 32 pixels, 140 / 218 at 64, and the 32-byte stack every
# shape had), where 32-wide tiles used all 255 and spilled (stacks of 48 bytes to 8.5 KB). Not yet timed:
# encode_speed.py's step section times these shapes on a GPU.
GPU_BLOCKS = (32, 16)
GPU_WARPS = 4
GPU_PROGRAMS = 264  # at most two programs per H100 SM: each sums its slabs' weight gradients into one row
INTERPRET_BLOCKS = (512, 128)  # the interpreter's cost is per operation: few, large tiles
INTERPRET_PROGRAMS = 2


@triton.jit
def _layer(desc, mult_ptr, layer, pl):
    """Row `layer` of the layer table, its kind broadcast to (BLOCK_P, 1) for masks, and its constant."""
    d = desc + layer * 8  # DESC columns
    kind = pl[:, None] * 0 + tl.load(d + 7)
    return (tl.load(d), tl.load(d + 1), tl.load(d + 2), tl.load(d + 3), tl.load(d + 4), tl.load(d + 5),
            tl.load(d + 6), kind, tl.load(mult_ptr + layer))


@triton.jit
def _encoding(dst, ty, tx, dim, r, c, tt):
    """A pixel's positional encoding into its scratch row at `dst`: row r's entry of the table ty plus column c's of
    tx (each zero in the other axis' columns, as SubgridNetwork makes them), in tiles of tt's width."""
    for j0 in range(0, dim, tt.shape[0]):
        j = j0 + tt
        m = j[None, :] < dim
        v = tl.load(ty + r[:, None] * dim + j[None, :], mask=m, other=0.0)
        v += tl.load(tx + c[:, None] * dim + j[None, :], mask=m, other=0.0)
        tl.store(dst + j[None, :], v, mask=m)


# Integers that vary with the architecture or the step's pixels are not specialised on (Triton would compile a kernel
# for each pattern of them divisible by 16 or equal to 1): one compile serves every encode.
@triton.jit(do_not_specialize=["kc", "n_pix", "n_layers", "pe_dim", "mpe_dim", "S", "period_off"])
def _forward_kernel(
    ws, desc, mult_ptr, rows_ptr, cols_ptr, kc, n_pix, n_layers,
    ey, ex, pe_dim, mey, mex, mpe_dim, out_ptr, scratch, S, period_off, omega,
    BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_slabs = tl.cdiv(n_pix, BLOCK_P)
    pl = tl.arange(0, BLOCK_P)
    tt = tl.arange(0, BLOCK_T)
    for s in range(pid, n_slabs, tl.num_programs(0)):
        p = s * BLOCK_P + pl
        pm = p < n_pix
        r = tl.load(rows_ptr + p // kc, mask=pm, other=0)
        c = tl.load(cols_ptr + p, mask=pm, other=0)
        base = scratch + p.to(tl.int64)[:, None] * S  # (BLOCK_P, 1): each pixel's scratch row
        # The modulation's encoding at the scratch row's start, the genesis' after it (offset mpe_dim).
        _encoding(base, mey, mex, mpe_dim, r, c, tt)
        _encoding(base + mpe_dim, ey, ex, pe_dim, r, c, tt)
        tl.debug_barrier()
        for layer in range(n_layers):
            K, M, w_off, b_off, src, u_off, h_off, kind, cst = _layer(desc, mult_ptr, layer, pl)
            # the sine's factor per pixel: the period (SINE_PERIOD) or the layer's constant
            per = tl.load(base + period_off, mask=kind == 1, other=cst)
            for m0 in range(0, M, BLOCK_T):
                mm = m0 + tt
                acc = tl.zeros((BLOCK_P, BLOCK_T), tl.float32)
                for k0 in range(0, K, BLOCK_T):
                    kk = k0 + tt
                    a = tl.load(base + src + kk[None, :], mask=kk[None, :] < K, other=0.0)
                    # W^T's tile: the weight is (M, K), row-major
                    wt = tl.load(ws + w_off + mm[None, :] * K + kk[:, None],
                                 mask=(kk[:, None] < K) & (mm[None, :] < M), other=0.0)
                    acc = tl.dot(a, wt, acc, input_precision=PREC)
                u = acc + tl.load(ws + b_off + mm, mask=mm < M, other=0.0)[None, :]
                tm = (mm[None, :] < M) & (kind >= 0)
                tl.store(base + u_off + mm[None, :], u, mask=tm)
                tl.store(base + h_off + mm[None, :], tl.sin(per * u), mask=tm & (kind <= 1))
                tl.store(base + period_off + mm[None, :], omega + cst * u, mask=tm & (kind == 2))
                tl.store(out_ptr + mm[None, :] * n_pix + p[:, None], u, mask=tm & pm[:, None] & (kind == 3))
            tl.debug_barrier()


@triton.jit(do_not_specialize=["n_params", "n_pix", "n_layers", "channels", "S", "period_off", "dperiod_off",
                               "out_h_off", "enc_end"])
def _backward_kernel(
    ws, desc, mult_ptr, grad_ptr, part, n_params, n_pix, n_layers, channels, scratch, S, period_off,
    dperiod_off, out_h_off, enc_end,
    BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_slabs = tl.cdiv(n_pix, BLOCK_P)
    pl = tl.arange(0, BLOCK_P)
    tt = tl.arange(0, BLOCK_T)
    row = part + pid.to(tl.int64) * n_params  # this program's row of the weight gradients' partial sums
    for s in range(pid, n_slabs, tl.num_programs(0)):
        later = (tt * 0 + s) != pid  # (BLOCK_T,): the program's first slab writes its row; later ones add to it
        p = s * BLOCK_P + pl
        pm = p < n_pix
        base = scratch + p.to(tl.int64)[:, None] * S
        # The output's gradient into the output layer's h slot (pixels past the image: zero, so they add nothing),
        # and the period's gradient zeroed: the genesis layers sum into it.
        for j0 in range(0, channels, BLOCK_T):
            j = j0 + tt
            m = j[None, :] < channels
            g = tl.load(grad_ptr + j[None, :] * n_pix + p[:, None], mask=m & pm[:, None], other=0.0)
            tl.store(base + out_h_off + j[None, :], g, mask=m)
        tl.store(base + dperiod_off, tl.zeros((BLOCK_P, 1), tl.float32), mask=(pl[:, None] * 0 + dperiod_off) >= 0)
        tl.debug_barrier()
        for i in range(n_layers):
            layer = n_layers - 1 - i
            K, M, w_off, b_off, src, u_off, h_off, kind, cst = _layer(desc, mult_ptr, layer, pl)
            per = tl.load(base + period_off, mask=kind == 1, other=cst)
            # 1. The gradient of u (over u's slot): sine layers dh * cos(f u) * f, with f the period or constant
            #    (and the period's gradient sum_m dh cos(f u) u); PERIOD sigma * dperiod; LINEAR the gradient as is.
            dp = tl.zeros((BLOCK_P,), tl.float32)
            for m0 in range(0, M, BLOCK_T):
                mm = m0 + tt
                tm = (mm[None, :] < M) & (kind >= 0)
                u = tl.load(base + u_off + mm[None, :], mask=tm, other=0.0)
                dh = tl.load(base + h_off + mm[None, :], mask=tm, other=0.0)
                g = dh * tl.cos(per * u)
                dp += tl.sum(g * u, axis=1)
                tl.debug_barrier()
                tl.store(base + u_off + mm[None, :], tl.where(kind <= 1, g * per, dh * cst), mask=tm)
            old = tl.load(base + dperiod_off, mask=kind == 1, other=0.0)
            tl.debug_barrier()  # every thread has read the old sum before any writes the new
            tl.store(base + dperiod_off, old + dp[:, None], mask=kind == 1)
            tl.debug_barrier()
            # 2. Weight and bias gradients: du^T h_in and the sum of du over the slab's pixels, into the row.
            for m0 in range(0, M, BLOCK_T):
                mm = m0 + tt
                du = tl.load(base + u_off + mm[None, :], mask=mm[None, :] < M, other=0.0)
                for k0 in range(0, K, BLOCK_T):
                    kk = k0 + tt
                    a = tl.load(base + src + kk[None, :], mask=kk[None, :] < K, other=0.0)
                    gw = tl.dot(tl.trans(du), a, input_precision=PREC)  # (BLOCK_T of M, BLOCK_T of K)
                    ptr = row + w_off + mm[:, None] * K + kk[None, :]
                    wm = (mm[:, None] < M) & (kk[None, :] < K)
                    prev = tl.load(ptr, mask=wm & later[:, None], other=0.0)
                    tl.debug_barrier()
                    tl.store(ptr, prev + gw, mask=wm)
                bptr = row + b_off + mm
                prev = tl.load(bptr, mask=(mm < M) & later, other=0.0)
                tl.debug_barrier()
                tl.store(bptr, prev + tl.sum(du, axis=0), mask=mm < M)
            # 3. The input's gradient du W (M, K), over the input's slot (the previous layer's h), unless the input
            #    is an encoding (src below the first layer's slots: a network's first layer).
            tl.debug_barrier()  # step 2 has read h_in
            if src >= enc_end:
                for k0 in range(0, K, BLOCK_T):
                    kk = k0 + tt
                    acc = tl.zeros((BLOCK_P, BLOCK_T), tl.float32)
                    for m0 in range(0, M, BLOCK_T):
                        mm = m0 + tt
                        du = tl.load(base + u_off + mm[None, :], mask=mm[None, :] < M, other=0.0)
                        w = tl.load(ws + w_off + mm[:, None] * K + kk[None, :],
                                    mask=(mm[:, None] < M) & (kk[None, :] < K), other=0.0)
                        acc = tl.dot(du, w, acc, input_precision=PREC)
                    tl.store(base + src + kk[None, :], acc, mask=(kk[None, :] < K) & (kind >= 0))
            tl.debug_barrier()


# ---- the network over a step's pixels ------------------------------------------------------------------------


def _interpreting() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_forward_kernel, InterpretedFunction)


class FusedNetwork:
    """subgrid.SubgridNetwork's `forward(tensors, rows, cols)` by the two kernels: the same arguments (tensors by
    name, gradients flowing back to them; rows and columns as ranges, or a drawn sample: rows (R,), each row's
    columns (R, K)) and the same (channels, pixels) output. CUDA tensors, or CPU ones under TRITON_INTERPRET=1."""

    def __init__(self, arch, h: int, w: int, device, precision: str = PRECISION):
        from pillow_nif.subgrid import SubgridNetwork

        if precision not in ("ieee", "tf32"):
            raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
        self.precision = precision  # tl.dot's input_precision (fit.FitConfig.tf32)

        dev = torch.device(device)
        if dev.type != "cuda" and not _interpreting():
            raise RuntimeError("the fused training kernels need CUDA (or TRITON_INTERPRET=1 for the CPU)")
        sub = SubgridNetwork(arch, h, w, dev)  # the row and column encoding tables
        self.arch = arch
        shapes = {n: torch.Size(s) for n, s in arch.tensor_shapes() if n.startswith(("genesis.", "modulation."))}
        self.names = list(shapes)
        offsets, at = {}, 0
        for n, s in shapes.items():
            offsets[n] = at
            at += s.numel()
        self.shapes, self.offsets, self.n_params = shapes, offsets, at
        self.ey, self.ex = (t.contiguous() for t in sub.genesis_axes)
        if arch.mod_widths:
            self.mey, self.mex = (t.contiguous() for t in sub.modulation_axes)
        else:
            self.mey, self.mex = torch.zeros(h, 0, device=dev), torch.zeros(w, 0, device=dev)
        mpe, pe = self.mey.shape[1], self.ey.shape[1]
        self.mpe_dim, self.pe_dim = mpe, pe
        # A pixel's scratch row: the two encodings, then per layer its u and h slots (the period layer's h slot
        # is the period's gradient, the output layer's the output's gradient), then the period.
        col = self.enc_end = mpe + pe
        table, mults = [], []

        def add(net, dims, src, kinds):
            nonlocal col
            for i in range(len(dims) - 1):
                kind, mult = kinds(i == len(dims) - 2)
                u, h = col, col + dims[i + 1]
                col += 2 * dims[i + 1]
                table.append((dims[i], dims[i + 1], offsets[f"{net}.{i}.weight"], offsets[f"{net}.{i}.bias"], src,
                              u, h, kind))
                mults.append(mult)
                src = h
            return h

        self.dperiod_off = -1
        if arch.mod_widths:
            self.dperiod_off = add("modulation", [mpe, *arch.mod_widths, 1], 0,
                                   lambda last: (PERIOD, arch.mod_sigma) if last else (SINE_CONST, arch.mod_omega))
        genesis = (SINE_PERIOD, 1.0) if arch.mod_widths else (SINE_CONST, arch.omega)
        self.out_h_off = add("genesis", [pe, *arch.widths, arch.channels], mpe,
                             lambda last: (LINEAR, 1.0) if last else genesis)
        self.period_off, self.S = col, col + 1
        self.n_layers = len(table)
        self.desc = torch.tensor(table, dtype=torch.int32, device=dev).reshape(-1)
        self.mults = torch.tensor(mults, dtype=torch.float32, device=dev)
        self.device = dev

    def forward(self, t: dict, rows, cols) -> torch.Tensor:
        if isinstance(rows, range):  # a strided grid: every column of every row
            rows = torch.arange(rows.start, rows.stop, rows.step, device=self.device)
            cols = torch.arange(cols.start, cols.stop, cols.step, device=self.device).expand(len(rows), -1)
        return _Fused.apply(self, rows.contiguous(), cols.reshape(-1).contiguous(), cols.shape[-1],
                            *(t[n] for n in self.names))

    def _launch(self, n_pix: int) -> tuple[int, int, int]:
        (bp, bt), programs = (INTERPRET_BLOCKS, INTERPRET_PROGRAMS) if _interpreting() else (GPU_BLOCKS, GPU_PROGRAMS)
        slabs = triton.cdiv(n_pix, bp)
        return bp, bt, min(slabs, programs)

    def run(self, packed, rows, cols, kc: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The output (channels, pixels) and the scratch the backward reads."""
        n_pix = cols.numel()
        bp, bt, programs = self._launch(n_pix)
        scratch = torch.empty(triton.cdiv(n_pix, bp) * bp * self.S, device=self.device)
        out = torch.empty(self.arch.channels, n_pix, device=self.device)
        _forward_kernel[(programs,)](
            packed, self.desc, self.mults, rows, cols, kc, n_pix, self.n_layers, self.ey, self.ex, self.pe_dim,
            self.mey, self.mex, self.mpe_dim, out, scratch, self.S, self.period_off, float(self.arch.omega),
            BLOCK_P=bp, BLOCK_T=bt, PREC=self.precision, num_warps=GPU_WARPS,
        )
        return out, scratch

    def gradients(self, packed, scratch, grad) -> torch.Tensor:
        """Every tensor's gradient, packed in `names` order, from the output's (channels, pixels)."""
        n_pix = grad.shape[1]
        bp, bt, programs = self._launch(n_pix)
        part = torch.empty(programs, self.n_params, device=self.device)
        _backward_kernel[(programs,)](
            packed, self.desc, self.mults, grad, part, self.n_params, n_pix, self.n_layers, self.arch.channels,
            scratch, self.S, self.period_off, self.dperiod_off, self.out_h_off, self.enc_end,
            BLOCK_P=bp, BLOCK_T=bt, PREC=self.precision, num_warps=GPU_WARPS,
        )
        return part.sum(0)


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, net, rows, cols, kc, *ws):
        packed = torch.cat([w.reshape(-1) for w in ws])
        out, scratch = net.run(packed, rows, cols, kc)
        ctx.net, ctx.packed, ctx.scratch = net, packed, scratch
        return out

    @staticmethod
    def backward(ctx, grad):
        net = ctx.net
        g = net.gradients(ctx.packed, ctx.scratch, grad.contiguous())
        ws = [g[net.offsets[n] : net.offsets[n] + net.shapes[n].numel()].view(net.shapes[n]) for n in net.names]
        return (None, None, None, None, *ws)
