"""Fused Triton forward and backward of the modulated sine layer, for training: y = sin(period * (x @ W + b)).

Shapes: x (N, K), W (K, M), b (M,), period (N, 1) or a float; or all with a leading batch dimension B (x
(B, N, K), W (B, K, M), b (B, M), period (B, N, 1)), as the batch encoder's stacked networks have them.
fp32 throughout; tl.dot with input_precision="ieee" (no TF32), so it matches torch's fp32 to ~1e-6.

Reference: `reference()` below, i.e. what NIF.forward_grid does per hidden layer. Eager torch moves, per
element of the N x M output, ~5 full passes forward (addmm writes z, the period product reads z and writes
it scaled, sin reads that and writes y: 20 bytes) and ~8 backward (sin's backward reads the saved argument
and dy, the product's backward writes dz and reduces z * g for dperiod, then two matmuls read dz: ~36
bytes). Fused: forward writes y and z (8 bytes); backward reads z and dy and writes dz once (12 bytes) in
the dx kernel, whose matmul consumes dz from registers, and the weight kernel reads dz once more (4 bytes).

Kernels
- `_forward_kernel`: one program per (BLOCK_N x BLOCK_M) output tile, a K loop of tl.dot, then the bias,
  period and sine in registers; stores y and (when training) the pre-activation z for the backward.
- `_backward_rows_kernel`: one program per (BLOCK_N x BLOCK_K) tile of dx, an M loop: dz = dy * period *
  cos(period z) in registers, dx += dz @ W^T; the programs of the first K block also store dz and the
  complete dperiod = sum_m dy * cos(period z) * z (a row's M loop is whole, so no atomics).
- `_backward_weights_kernel`: stage one of the weight gradients: one program per (row group, K block,
  M block) sums x^T @ dz and sum(dz) over its rows; stage two sums the row groups' partials (torch.sum),
  so the reduction is deterministic (no atomics) and its order fixed.
Edges: block dims are powers of two >= 16 (tl.dot's minimum), loads past an edge read zeros and stores are
masked: the same as zero-padding every operand to a multiple of 16, without copies.

Use in training (CUDA): `sine_layer(h, W.T, b, period)` in place of `torch.sin(period * F.linear(h, W, b))`;
`pillow_nif.batch.StackedNIF(..., use_fused=True)` does so for every hidden sine layer. Measured on an H200
(benchmarks/NOTES.md round 43), the saved traffic does not pay at these widths: a training step of one 768x512
image's 1.0 bpp network (82.5k parameters, 98k pixels) took 21.3 ms with it against 9.5 ms with torch's
matmuls, so the encoders use torch and this stays an option.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PRECISION = "ieee"
# (BLOCK_N, BLOCK_M, BLOCK_K) caps: GPU tiles sized for registers; the interpreter's cost is per
# operation, so it wants few, large tiles.
GPU_BLOCKS = (64, 64, 32)
INTERPRET_BLOCKS = (256, 128, 128)
GPU_WEIGHT_PROGRAMS = 1024  # programs the weight-gradient stage one aims for (several per SM)


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, period) -> torch.Tensor:
    """The eager torch layer the kernels must match (model.NIF.forward_grid's hidden layers)."""
    return torch.sin(period * (torch.matmul(x, w) + b.unsqueeze(-2)))


# ---- kernels --------------------------------------------------------------------------------------------


@triton.jit
def _tile(ptr, rows, cols, s_row, s_col, n_rows, n_cols):
    """Block [rows, cols] of a strided matrix, zeros outside its n_rows x n_cols."""
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + rows[:, None] * s_row + cols[None, :] * s_col, mask=mask, other=0.0)


@triton.jit
def _forward_kernel(
    x_ptr,  # (B, N, K) input activations
    w_ptr,  # (B, K, M) weights (any strides: a transposed view is fine)
    b_ptr,  # (B, M) bias
    p_ptr,  # (B, N) period per row; unused when HAS_PERIOD is false
    y_ptr,  # (B, N, M) output, contiguous
    z_ptr,  # (B, N, M) pre-activation x @ W + b, contiguous; written only when SAVE_Z
    N, K, M,  # problem size
    omega,  # the period when HAS_PERIOD is false
    sxb, sxn, sxk,  # strides of x
    swb, swk, swm,  # strides of W
    sbb, sbm,  # strides of b
    spb, spn,  # strides of period
    HAS_PERIOD: tl.constexpr,
    SAVE_Z: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_n, pid_m, bi = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    x_ptr += bi.to(tl.int64) * sxb
    w_ptr += bi.to(tl.int64) * swb
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xt = _tile(x_ptr, rn, rk, sxn, sxk, N, K)
        wt = _tile(w_ptr, rk, rm, swk, swm, K, M)
        acc = tl.dot(xt, wt, acc, input_precision=PREC)
    z = acc + tl.load(b_ptr + bi * sbb + rm * sbm, mask=rm < M, other=0.0)[None, :]
    if HAS_PERIOD:
        p = tl.load(p_ptr + bi * spb + rn * spn, mask=rn < N, other=0.0)
    else:
        p = tl.zeros((BLOCK_N,), tl.float32) + omega
    offs = bi.to(tl.int64) * N * M + rn[:, None] * M + rm[None, :]
    mask = (rn < N)[:, None] & (rm < M)[None, :]
    tl.store(y_ptr + offs, tl.sin(p[:, None] * z), mask=mask)
    if SAVE_Z:
        tl.store(z_ptr + offs, z, mask=mask)


@triton.jit
def _backward_rows_kernel(
    dy_ptr,  # (B, N, M) gradient of the output, contiguous
    z_ptr,  # (B, N, M) saved pre-activation, contiguous
    w_ptr,  # (B, K, M) weights (any strides)
    p_ptr,  # (B, N) period per row; unused when HAS_PERIOD is false
    dx_ptr,  # (B, N, K) out: gradient of x, contiguous
    dz_ptr,  # (B, N, M) out: gradient of the pre-activation, contiguous (for the weight kernel)
    dp_ptr,  # (B, N) out: gradient of the period; written only when HAS_PERIOD
    N, K, M,
    omega,
    swb, swk, swm,  # strides of W
    spb, spn,  # strides of period
    HAS_PERIOD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_n, pid_k, bi = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if HAS_PERIOD:
        p = tl.load(p_ptr + bi * spb + rn * spn, mask=rn < N, other=0.0)
    else:
        p = tl.zeros((BLOCK_N,), tl.float32) + omega
    w_ptr += bi.to(tl.int64) * swb
    row = bi.to(tl.int64) * N * M + rn[:, None] * M
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    dp = tl.zeros((BLOCK_N,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mask = (rn < N)[:, None] & (rm < M)[None, :]
        z = tl.load(z_ptr + row + rm[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + row + rm[None, :], mask=mask, other=0.0)
        g = dy * tl.cos(p[:, None] * z)  # d loss / d (period * z)
        dz = g * p[:, None]
        dp += tl.sum(g * z, axis=1)
        if pid_k == 0:  # the programs of the first K block write dz (and dperiod)
            tl.store(dz_ptr + row + rm[None, :], dz, mask=mask)
        wt = _tile(w_ptr, rm, rk, swm, swk, M, K)  # W^T
        acc = tl.dot(dz, wt, acc, input_precision=PREC)  # dx += dz @ W^T
    offs = bi.to(tl.int64) * N * K + rn[:, None] * K + rk[None, :]
    tl.store(dx_ptr + offs, acc, mask=(rn < N)[:, None] & (rk < K)[None, :])
    if HAS_PERIOD:
        if pid_k == 0:
            tl.store(dp_ptr + bi * N + rn, dp, mask=rn < N)


@triton.jit
def _backward_weights_kernel(
    x_ptr,  # (B, N, K) input activations (any strides)
    dz_ptr,  # (B, N, M) gradient of the pre-activation, contiguous
    dw_ptr,  # (B, G, K, M) out: per-row-group partial sums of x^T @ dz, contiguous
    db_ptr,  # (B, G, M) out: per-row-group partial sums of dz, contiguous
    N, K, M,
    rows_per_group,  # a multiple of BLOCK_N
    sxb, sxn, sxk,  # strides of x
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    grp, tile, bi = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_m = tl.cdiv(M, BLOCK_M)
    pid_k = tile // n_m
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = (tile % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    x_ptr += bi.to(tl.int64) * sxb
    dz_ptr += bi.to(tl.int64) * N * M
    acc = tl.zeros((BLOCK_K, BLOCK_M), tl.float32)
    db = tl.zeros((BLOCK_M,), tl.float32)
    start = grp * rows_per_group
    for n0 in range(start, tl.minimum(start + rows_per_group, N), BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        xt = _tile(x_ptr, rk, rn, sxk, sxn, K, N)  # x^T
        dz = _tile(dz_ptr, rn, rm, M, 1, N, M)
        acc = tl.dot(xt, dz, acc, input_precision=PREC)  # x^T @ dz over this group's rows
        db += tl.sum(dz, axis=0)
    g_all = tl.num_programs(0)
    base = (bi.to(tl.int64) * g_all + grp) * K * M
    tl.store(dw_ptr + base + rk[:, None] * M + rm[None, :], acc, mask=(rk < K)[:, None] & (rm < M)[None, :])
    if pid_k == 0:  # once per M block
        tl.store(db_ptr + (bi * g_all + grp) * M + rm, db, mask=rm < M)


# ---- host side ------------------------------------------------------------------------------------------


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(1, n))))


def _blocks(n: int, m: int, k: int, device: torch.device) -> tuple[int, int, int]:
    caps = GPU_BLOCKS if device.type == "cuda" else INTERPRET_BLOCKS
    return _block(n, caps[0]), _block(m, caps[1]), _block(k, caps[2])


def _check(x, w, b, period):
    if x.dim() != 3 or w.dim() != 3 or b.dim() != 2:
        shapes = ", ".join(str(tuple(t.shape)) for t in (x, w, b))
        raise ValueError(f"want x (B, N, K), W (B, K, M), b (B, M); got {shapes}")
    bsz, n, k = x.shape
    if w.shape[:2] != (bsz, k) or b.shape != (bsz, w.shape[2]):
        raise ValueError(f"shapes do not agree: x {tuple(x.shape)}, W {tuple(w.shape)}, b {tuple(b.shape)}")
    if period is not None and period.shape != (bsz, n):
        raise ValueError(f"period must have one value per row of x, got {tuple(period.shape)}")
    if bsz * n * max(k, w.shape[2]) >= 1 << 31:
        raise ValueError("sine_layer indexes with 32-bit offsets: B * N * max(K, M) must stay below 2**31")
    for name, t in (("x", x), ("W", w), ("b", b), ("period", period)):
        if t is not None and (t.dtype != torch.float32 or t.device != x.device):
            raise ValueError(f"{name} must be float32 on {x.device}, got {t.dtype} on {t.device}")


def _forward(x, w, b, period, omega: float, save_z: bool):
    bsz, n, k = x.shape
    m = w.shape[2]
    y = torch.empty((bsz, n, m), device=x.device, dtype=torch.float32)
    z = torch.empty_like(y) if save_z else y  # z_ptr is not written when SAVE_Z is false
    bn, bm, bk = _blocks(n, m, k, x.device)
    p = period if period is not None else x  # any pointer: not read without HAS_PERIOD
    sp = period.stride() if period is not None else (0, 0)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), bsz)
    _forward_kernel[grid](
        x, w, b, p, y, z, n, k, m, float(omega), *x.stride(), *w.stride(), *b.stride(), *sp,
        HAS_PERIOD=period is not None, SAVE_Z=save_z, BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, PREC=PRECISION,
    )
    return y, (z if save_z else None)


def _backward(dy, x, w, z, period, omega: float, need_weights: bool):
    bsz, n, k = x.shape
    m = w.shape[2]
    dy = dy.contiguous()
    dx = torch.empty((bsz, n, k), device=x.device, dtype=torch.float32)
    dz = torch.empty((bsz, n, m), device=x.device, dtype=torch.float32)
    dp = torch.empty((bsz, n), device=x.device, dtype=torch.float32) if period is not None else None
    bn, bm, bk = _blocks(n, m, k, x.device)
    p = period if period is not None else x
    sp = period.stride() if period is not None else (0, 0)
    _backward_rows_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk), bsz)](
        dy, z, w, p, dx, dz, dp if dp is not None else dx, n, k, m, float(omega), *w.stride(), *sp,
        HAS_PERIOD=period is not None, BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, PREC=PRECISION,
    )
    if not need_weights:
        return dx, None, None, dp
    tiles = triton.cdiv(k, bk) * triton.cdiv(m, bm)
    row_blocks = triton.cdiv(n, bn)
    if x.device.type == "cuda":  # enough row groups to fill the GPU; stage two sums them
        groups = max(1, min(row_blocks, GPU_WEIGHT_PROGRAMS // (tiles * bsz)))
    else:
        groups = min(row_blocks, 4)
    rows = triton.cdiv(row_blocks, groups) * bn
    groups = triton.cdiv(n, rows)
    dw_part = torch.empty((bsz, groups, k, m), device=x.device, dtype=torch.float32)
    db_part = torch.empty((bsz, groups, m), device=x.device, dtype=torch.float32)
    _backward_weights_kernel[(groups, tiles, bsz)](
        x, dz, dw_part, db_part, n, k, m, rows, *x.stride(),
        BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, PREC=PRECISION,
    )
    return dx, dw_part.sum(1), db_part.sum(1), dp


class _SineLayer(torch.autograd.Function):
    """sin(period * (x @ W + b)) on (B, N, K) x (B, K, M); period (B, N) or None (then the float omega)."""

    @staticmethod
    def forward(ctx, x, w, b, period, omega):
        _check(x, w, b, period)
        y, z = _forward(x, w, b, period, omega, save_z=any(ctx.needs_input_grad[:4]))
        ctx.save_for_backward(x, w, z, period)
        ctx.omega = omega
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, z, period = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db, dp = _backward(dy, x, w, z, period, ctx.omega, need_weights=need[1] or need[2])
        return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None,
                dp if need[3] else None, None)


def sine_layer(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, period) -> torch.Tensor:
    """y = sin(period * (x @ W + b)), differentiable in x, W, b and period, fused in Triton.

    x (N, K), W (K, M), b (M,), period (N, 1) or a float; or with a leading batch dimension on each
    (period (B, N, 1)). Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (slow: for tests).
    """
    batched = x.dim() == 3
    if isinstance(period, torch.Tensor) and (period.dim() != x.dim() or period.shape[-1] != 1):
        raise ValueError(f"period must be (N, 1) or (B, N, 1) for x {tuple(x.shape)}, got {tuple(period.shape)}")
    if not batched:
        x, w, b = x.unsqueeze(0), w.unsqueeze(0), b.unsqueeze(0)
    if isinstance(period, torch.Tensor):
        p, omega = period.reshape(period.shape[:-1]).reshape(x.shape[0], -1), 0.0
    else:
        p, omega = None, float(period)
    y = _SineLayer.apply(x, w, b, p, omega)
    return y if batched else y.squeeze(0)


__all__ = ["reference", "sine_layer"]
