"""Which pixels a fitting step sees where it cannot see them all: importance sampling by recent error.

A step that samples a strided grid (fit.Fitter.sample) gives every pixel the same chance, so most of its pixels
fall on smooth regions the network already fits, while the error, and so the gradient, sits in edges and texture.
Drawing pixels in proportion to their error and weighting each pixel's loss by 1 / (its chance x the pixel count)
keeps the loss an unbiased estimate of the whole image's mean loss, with a smaller variance (soft mining,
Kheradmand et al., CVPR 2024, for neural fields).

The draw keeps a step's shape a grid of R rows x K columns, each row with K columns of its own, so the first
layer stays separable in rows (subgrid.py): R rows by systematic sampling on the rows' total weight, then K
columns of each by systematic sampling within the row. Row and column draws multiply to the pixel's own
chance; systematic sampling keeps the draws spread (no two of a row's columns closer than its weight forces).
A pixel's weight is (1 - share) x the mean plus share x its last measured loss ** power; the uniform part keeps
every pixel visited, so an error that grows where the map is stale is still found.
"""

from __future__ import annotations

import torch


class ImportanceSampler:
    """Draws (rows (R,), cols (R, K)) and their loss weights (R, K); `observe` records the step's per-pixel losses."""

    def __init__(self, h: int, w: int, rows: int, cols: int, share: float, power: float, device, generator,
                 refresh: int = 16):
        self.h, self.w, self.rows, self.cols = h, w, rows, cols
        self.share, self.power, self.refresh = share, power, refresh
        self.gen = generator
        self.err = torch.ones(h, w, device=device)  # until measured, every pixel alike: the first draws are uniform
        self.steps = torch.arange(max(rows, cols), device=device, dtype=torch.float64)
        self.draws = 0

    def _uniforms(self, n: int, count: int) -> torch.Tensor:
        """n rows of `count` systematic points in [0, 1): one random offset per row, then evenly spaced."""
        u = torch.rand(n, 1, generator=self.gen, dtype=torch.float64).to(self.steps.device)
        return (u + self.steps[:count]) / count

    def _weigh(self) -> None:
        """Each pixel's weight q from the error map, and the cumulative sums the draws invert."""
        e = self.err.pow(self.power) if self.power != 1 else self.err
        self.q = e.mul(self.share).add_((float(e.mean()) + 1e-12) * (1 - self.share))  # > 0 everywhere
        self.col_cdf = self.q.cumsum(1)
        self.row_mass = self.col_cdf[:, -1].double()
        self.row_cdf = self.row_mass.cumsum(0)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Weighing the whole map takes ~8 ms at 768x512, a tenth of a step; a step changes 1/64 of it, so the
        # weights are refreshed every `refresh` draws (each draw's loss weights are from the map it drew from).
        if self.draws % self.refresh == 0:
            self._weigh()
        self.draws += 1
        total = self.row_cdf[-1]
        rows = torch.searchsorted(self.row_cdf, self._uniforms(1, self.rows)[0] * total, right=True)
        rows.clamp_(max=self.h - 1)
        within = (self._uniforms(self.rows, self.cols) * self.row_mass[rows, None]).float()
        cols = torch.searchsorted(self.col_cdf[rows], within, right=True).clamp_(max=self.w - 1)
        # 1 / (chance x pixels): the chance of pixel (r, c) in one draw is q[r, c] / total.
        weights = (total / (self.h * self.w)).float() / self.q[rows[:, None], cols]
        return rows, cols, weights

    def observe(self, rows: torch.Tensor, cols: torch.Tensor, losses: torch.Tensor) -> None:
        """The step's loss at each drawn pixel, (R, K); a pixel drawn twice has the same loss both times."""
        self.err[rows[:, None], cols] = losses.clamp(min=0)  # log-cosh rounds to -1e-8 at 0
