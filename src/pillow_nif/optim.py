"""The optimiser of the fitting stages: Muon on the genesis hidden and output matrices, AdamW on the rest.

Muon (K. Jordan et al. 2024; "Muon is Scalable for LLM Training", Liu et al. 2025) replaces each weight
matrix's momentum by its nearest semi-orthogonal matrix (a few Newton-Schulz iterations), so that every
direction of the layer's update moves at the same rate instead of the few that dominate the gradient.
The sine layers' units are strongly correlated, and Adam's per-weight scaling does not see that.
Measured against AdamW everywhere (benchmarks/NOTES.md #84): +0.15 / +0.10 dB at 0.6 / 1.0 bpp on all 24
Kodak 256x256 crops (torch's own Muon: +0.17 on 8 of them). The input layer stays on AdamW: a preconditioned
input layer grows heavy-tailed weights that quantise badly (SOAP there lost 0.42 dB in the coded file while
fitting 0.32 dB better, #76).
The fit gives the Muon matrices a strong decoupled weight decay (FitConfig.muon_decay): fixed-size updates
grow the weights, and smaller weights quantise with smaller phase errors (+0.07 / +0.19 dB more on the 24
crops, #85).

torch ships torch.optim.Muon, and this follows its update exactly (EMA momentum with a Nesterov blend, the
quintic Newton-Schulz iteration and its coefficients, the update scaled to AdamW's RMS, decoupled weight
decay). It is written again here for two reasons: batch.py trains a stack of networks whose parameters are
(B, out, in), which torch's accepts only as 2-D, and torch's orthogonalises in bfloat16, whose matmuls are
slow on CPUs without bf16 units and round differently on each; here every leading dimension is a batch of
independent matrices (a stacked fit gives each image its own update) and the iteration runs in float32.
"""

from __future__ import annotations

import math

import torch

# Coefficients of the quintic iteration X <- a X + (b A + c A^2) X, A = X X^T: torch.optim.Muon's defaults,
# chosen to push every singular value into roughly 0.5 ... 1.5 in five steps rather than converge to exactly 1.
_NS = (3.4445, -4.7750, 2.0315)
_NS_STEPS = 5


def orthogonalise(g: torch.Tensor, steps: int = _NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, for every (m, n) matrix of a (..., m, n) stack."""
    tall = g.shape[-2] > g.shape[-1]
    x = (g.mT if tall else g).reshape(-1, *sorted(g.shape[-2:]))  # wide side: the Gram matrix is the small one
    x = x / torch.linalg.matrix_norm(x, keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    a, b, c = _NS
    for _ in range(steps):  # three fused matmuls a step: the optimiser's time is mostly per-call overhead
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(*g.shape[:-2], *x.shape[-2:])
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for (..., m, n) stacks of weight matrices, with torch.optim.Muon's "match_rms_adamw" scaling:
    the learning rate and weight decay tuned for AdamW carry over."""

    def __init__(self, params, lr: float = 3e-3, momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon trains matrices, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            mu, lr = group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(p)
                buf = state["momentum"].lerp_(p.grad, 1 - mu)
                update = orthogonalise(p.grad.lerp(buf, mu))  # Nesterov: look one momentum step ahead
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                # An orthogonal (m, n) update has RMS 1/sqrt(max(m, n)); 0.2 sqrt(max) brings it to AdamW's ~0.2.
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape[-2:])))


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

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self):
        for o in self.optimizers:
            o.step()
