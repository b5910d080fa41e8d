"""The optimisers of the fitting stages: Muon on the genesis network's weight matrices, AdamW on the rest.

Muon (K. Jordan et al. 2024; "Muon is Scalable for LLM Training", Liu et al. 2025) replaces each weight
matrix's momentum by its nearest semi-orthogonal matrix (a few Newton-Schulz iterations), so that every
direction of the layer's update moves at the same rate instead of the few that dominate the gradient.
The sine layers' units are strongly correlated, and Adam's per-weight scaling does not see that.
Measured against AdamW everywhere (benchmarks/NOTES.md #84): +0.15 / +0.10 dB at 0.6 / 1.0 bpp on all 24
Kodak 256x256 crops (torch's own Muon: +0.17 on 8 of them). The input layer first stayed on AdamW (a
preconditioned input layer had grown heavy-tailed weights that quantise badly: SOAP there lost 0.42 dB, #76).
The fit gives the Muon matrices a strong decoupled weight decay (FitConfig.muon_decay): fixed-size updates
grow the weights, and smaller weights quantise with smaller phase errors (+0.07 / +0.19 dB more on the 24
crops, #85). With its own decay (FitConfig.input_decay) the input layer gained on Muon too: +0.13 / +0.17 dB
at 0.6 / 1.0 bpp on 8 crops, every crop up (#112).

torch ships torch.optim.Muon, and this follows its update exactly (EMA momentum with a Nesterov blend, the
quintic Newton-Schulz iteration and its coefficients, the update scaled to AdamW's RMS, decoupled weight
decay). It is written again here for two reasons: batch.py trains a stack of networks whose parameters are
(B, out, in), which torch's accepts only as 2-D, and torch's orthogonalises in bfloat16, whose matmuls are
slow on CPUs without bf16 units and round differently on each; here every leading dimension is a batch of
independent matrices (a stacked fit gives each image its own update) and the iteration runs in float32.
"""

from __future__ import annotations

import contextlib
import math

import torch

# Coefficients of the quintic iteration X <- a X + (b A + c A^2) X, A = X X^T: torch.optim.Muon's defaults,
# chosen to push every singular value into roughly 0.5 ... 1.5 in five steps rather than converge to exactly 1.
_NS = (3.4445, -4.7750, 2.0315)
_NS_STEPS = 5


def _newton_schulz(x: torch.Tensor, steps: int, eps: float) -> torch.Tensor:
    """The quintic iteration on a (k, m, n) stack of wide matrices (m <= n): approximately U V^T of each."""
    x = x / torch.linalg.matrix_norm(x, keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    a, b, c = _NS
    for _ in range(steps):  # three fused matmuls a step: the optimiser's time is mostly per-call overhead
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def orthogonalise(g: torch.Tensor, steps: int = _NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, for every (m, n) matrix of a (..., m, n) stack."""
    return orthogonalise_all([g], steps, eps)[0]


def orthogonalise_all(gs: list[torch.Tensor], steps: int = _NS_STEPS, eps: float = 1e-7) -> list[torch.Tensor]:
    """orthogonalise() of several stacks of matrices of any shapes, in zero-padded stacks (_Stacks)."""
    return _Stacks(gs).orthogonalise(gs, steps, eps)


@contextlib.contextmanager
def tf32_products(enabled: bool):
    """torch's float32 matmuls in TF32 on CUDA within the block where `enabled` (fit.FitConfig.tf32), as they were
    after.

    Through torch.set_float32_matmul_precision, torch's public switch across versions: its two flag APIs may not be
    mixed (reading one after the other was set raises). The setting is the process's, so CUDA products that other
    threads make meanwhile are TF32 too; the fused decoder's are not (its kernels choose their own precision)."""
    if not enabled:
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class _PaddedStack:
    """Stacks of matrices of several shapes as slots of one zero-padded (k, m, n) stack of wide matrices.

    Zero rows and columns stay zero through the Newton-Schulz iteration and leave the rest as it would be on its
    own (the Gram matrix is block diagonal), so padding to the largest shape gives each matrix its own update, in
    15 batched matmuls instead of 15 per tensor (on the CPU those small calls were the optimiser's time). Muon
    keeps its stacks (_Stacks: one, unless padding would cost more than the calls it saves) across steps: the
    stacks and their layout are built once, not at every step.
    """

    def __init__(self, like: list[torch.Tensor]):
        self.layout = []  # per tensor: its first index in the stack, matrix count, stored (wide) shape, transposed
        k = m = n = 0
        for g in like:
            tall = g.shape[-2] > g.shape[-1]  # stored wide: the Gram matrix is then the small one
            wide = (*g.shape[:-2], g.shape[-1], g.shape[-2]) if tall else tuple(g.shape)
            count = g.shape[:-2].numel()
            self.layout.append((k, count, wide, tall))
            k, m, n = k + count, max(m, wide[-2]), max(n, wide[-1])
        self.stack = like[0].new_zeros(k, m, n)

    def slots(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Views of each tensor's place in `x` (the stack or an iterate of it), in the tensor's own shape."""
        out = []
        for first, count, wide, tall in self.layout:
            v = x[first : first + count, : wide[-2], : wide[-1]].view(wide)
            out.append(v.mT if tall else v)
        return out

    def orthogonalise(self, gs: list[torch.Tensor], steps: int = _NS_STEPS, eps: float = 1e-7) -> list[torch.Tensor]:
        torch._foreach_copy_(self.slots(self.stack), gs)  # the padding is never written: it stays zero
        return self.slots(_newton_schulz(self.stack, steps, eps))


# What a Newton-Schulz run costs beyond its arithmetic, in float operations per iteration. A run is ~16 calls;
# five tiny matrices run one by one took 1.1-1.4 ms on two threads (~0.25 ms a run, ~2.5 MFLOP an iteration at the
# ~50 GFLOP/s these products reach on this project's CPU). 4 MFLOP keeps the small networks of 256x256 crops in
# one stack, where a split measured even on two threads (0.75 / 0.89 ms, 1.04 / 1.04) and their files stay the
# same bits (benchmarks/NOTES.md #132).
_CALL_FLOPS = 4e6


def _ns_flops(count: int, m: int, n: int) -> float:
    """Float operations of one Newton-Schulz iteration on `count` wide (m, n) matrices: X X^T, G G, (.) X."""
    return count * (4 * m * m * n + 2 * m**3)


def _partition(shapes: list[tuple[int, int, int]]) -> list[list[int]]:
    """Indices of (count, m, n) wide shapes grouped into stacks of least estimated cost (calls + padded flops).

    One stack for all pays for every matrix at the largest's size: at 768x512, 1.0 bpp, the genesis matrices
    (290 x 58 ... 3 x 72) padded to 130 x 290 took 5.6 ms an update on two threads (9.7 on one) against 2.3 (4.1)
    in the three stacks chosen here; at 0.6 bpp 3.1 (4.7) against 1.7 (2.0). Matrices sorted by size, a stack is
    a run of that order, and the runs are chosen by dynamic programming."""
    order = sorted(range(len(shapes)), key=lambda i: shapes[i][1] * shapes[i][2], reverse=True)

    def cost(run):
        sub = [shapes[i] for i in run]
        return _CALL_FLOPS + _ns_flops(sum(c for c, _, _ in sub), max(m for _, m, _ in sub), max(n for *_, n in sub))

    best = [(0.0, [])]  # best[i]: the cheapest grouping of order[:i]
    for i in range(1, len(order) + 1):
        best.append(min((best[j][0] + cost(order[j:i]), best[j][1] + [order[j:i]]) for j in range(i)))
    return [sorted(run) for run in best[-1][1]]  # each stack in the given order: one stack is the same as before


class _Stacks:
    """Matrices of several shapes in as many _PaddedStacks as _partition finds cheapest; built once."""

    def __init__(self, like: list[torch.Tensor]):
        shapes = [(g.shape[:-2].numel(), min(g.shape[-2:]), max(g.shape[-2:])) for g in like]
        self.groups = _partition(shapes)
        self.stacks = [_PaddedStack([like[i] for i in group]) for group in self.groups]

    def orthogonalise(self, gs: list[torch.Tensor], steps: int = _NS_STEPS, eps: float = 1e-7) -> list[torch.Tensor]:
        out = [None] * len(gs)
        for group, stack in zip(self.groups, self.stacks):
            for i, u in zip(group, stack.orthogonalise([gs[i] for i in group], steps, eps)):
                out[i] = u
        return out


def group_rate(g: dict):
    """A group's step size: the stage's rate g["lr"] (a Python float, or a 0-d tensor a CUDA graph reads at each
    replay) times the group's own lr_scale where it has one (fit.FitConfig.period_lr's group)."""
    return g["lr"] * g["lr_scale"] if "lr_scale" in g else g["lr"]


class _Optimiser:
    """What the fit uses of torch.optim.Optimizer (param_groups, state, zero_grad), without torch.optim: its
    constructor imports torch._dynamo, which took 2.6-3.5 s once per process on this project's CPU, a third of
    an effort-1 encode of the 256x256 example (benchmarks/NOTES.md #130); a GPU encode's target is 5 s."""

    def __init__(self, params, defaults: dict):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        if not any(g["params"] for g in self.param_groups):
            raise ValueError("the optimiser got no parameters")
        self.state: dict = {}  # parameter -> its per-parameter state, created at its first step

    def zero_grad(self):
        """Drops the gradients (torch's set_to_none=True, the cheaper choice)."""
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    def _with_grads(self):
        """(group, its parameters that have a gradient) for every group, in order."""
        return [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]

    def _state(self, p) -> dict:
        """p's state, made by the optimiser's _fresh(p) at p's first step."""
        s = self.state.get(p)
        if s is None:
            s = self.state[p] = self._fresh(p)
        return s


class Muon(_Optimiser):
    """Muon for (..., m, n) stacks of weight matrices, with torch.optim.Muon's "match_rms_adamw" scaling:
    the learning rate and weight decay tuned for AdamW carry over."""

    def __init__(self, params, lr: float = 3e-3, momentum: float = 0.95, weight_decay: float = 0.0,
                 tf32: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        # The Newton-Schulz products in TF32 on CUDA (fit.FitConfig.tf32): torch.optim.Muon runs them in bfloat16
        self.tf32 = tf32
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon trains matrices, got a parameter of shape {tuple(p.shape)}")
        self._stacks: dict[tuple, _Stacks] = {}  # per set of parameters stepped together

    def _fresh(self, p) -> dict:
        return {"momentum": torch.zeros_like(p)}

    @torch.no_grad()
    def step(self):
        """One update of every group's matrices, orthogonalised together in _Stacks (a group sets the momentum,
        rate and decay of its own)."""
        groups = self._with_grads()
        params = [p for _, ps in groups for p in ps]
        if not params:
            return
        key = tuple(map(id, params))
        if key not in self._stacks:
            self._stacks[key] = _Stacks(params)
        blends = []  # Nesterov: one momentum step ahead
        for g, ps in groups:
            if ps:
                grads = [p.grad for p in ps]
                bufs = [self._state(p)["momentum"] for p in ps]
                torch._foreach_lerp_(bufs, grads, 1 - g["momentum"])
                blends += torch._foreach_lerp(grads, bufs, g["momentum"])
        with tf32_products(self.tf32 and params[0].is_cuda):
            updates = iter(self._stacks[key].orthogonalise(blends))
        for g, ps in groups:
            if not ps:
                continue
            lr, decay = group_rate(g), g["weight_decay"]
            if decay:
                torch._foreach_mul_(ps, 1 - lr * decay)
            # An orthogonal (m, n) update has RMS 1/sqrt(max(m, n)); 0.2 sqrt(max) brings it to AdamW's ~0.2.
            ups = [next(updates) for _ in ps]
            if isinstance(lr, torch.Tensor):  # a rate on the device (stepgraph.py): read at each graph replay
                scaled = torch._foreach_mul(ups, [0.2 * math.sqrt(max(p.shape[-2:])) for p in ps])
                torch._foreach_mul_(scaled, -lr)
            else:
                scaled = torch._foreach_mul(ups, [-lr * 0.2 * math.sqrt(max(p.shape[-2:])) for p in ps])
            torch._foreach_add_(ps, scaled)


class AdamW(_Optimiser):
    """torch.optim.AdamW(fused=True)'s arithmetic: its state (the moments and a float32 step count per
    parameter), created at a parameter's first step, and its fused kernel, called as torch.optim.adam._fused_adamw
    calls it, so the updates are bitwise the same (tests/test_optim.py). Without torch.optim's per-step
    bookkeeping (it regroups the tensors and reads their state at every call) a step of the 0.5 bpp example's
    three groups took 0.14 instead of 0.34 ms on the CPU (benchmarks/NOTES.md #110), and 96-121 instead of
    119-158 us once torch.optim was gone altogether (#130)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False):
        if amsgrad:
            raise ValueError("amsgrad is not supported")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _fresh(self, p) -> dict:
        if not p.is_floating_point():
            raise ValueError(f"AdamW trains floating-point tensors, got {p.dtype}")
        return dict(step=torch.zeros((), dtype=torch.float32, device=p.device), exp_avg=torch.zeros_like(p),
                    exp_avg_sq=torch.zeros_like(p))

    @torch.no_grad()
    def step(self):
        for g, ps in self._with_grads():
            if not ps:
                continue
            states = [self._state(p) for p in ps]
            counts = [s["step"] for s in states]
            torch._foreach_add_(counts, 1)
            torch._fused_adamw_(ps, [p.grad for p in ps], [s["exp_avg"] for s in states],
                                [s["exp_avg_sq"] for s in states], [], counts, lr=group_rate(g),
                                beta1=g["betas"][0], beta2=g["betas"][1], weight_decay=g["weight_decay"], eps=g["eps"],
                                amsgrad=False, maximize=False)


class Chain:
    """Several optimisers, each over its own parameters, used as one (param_groups, state, step, zero_grad)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        # A plain dict of the live per-parameter states: a ChainMap would look a parameter up in the first
        # optimiser's defaultdict, which creates an empty entry there instead of finding the second's.
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def zero_grad(self):
        for o in self.optimizers:
            o.zero_grad()

    def step(self):
        for o in self.optimizers:
            o.step()
