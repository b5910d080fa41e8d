"""Per-tensor uniform quantisation: value = step * symbol with |symbol| <= qmax (one function per mode)."""

from __future__ import annotations

import torch


def symbols(w: torch.Tensor, step: float, qmax: int) -> torch.Tensor:
    """Integer symbols of a tensor (round half away from zero is not needed: torch.round is half-even)."""
    return torch.clamp(torch.round(w.detach().double() / step), -qmax, qmax).to(torch.int64)


def dequantize(sym: torch.Tensor, step: float) -> torch.Tensor:
    return sym.to(torch.float64) * step


def fake_quantize(w: torch.Tensor, step: float, qmax: int) -> torch.Tensor:
    """Quantise in the forward pass, pass the gradient straight through (for quantisation-aware tuning)."""
    q = torch.clamp(torch.round(w / step), -qmax, qmax) * step
    return w + (q - w).detach()
