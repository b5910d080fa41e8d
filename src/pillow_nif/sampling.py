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
        self.draws = 0  # made so far, including those made ahead
        self.ahead: list = []

    def _weigh(self) -> None:
        """Each pixel's weight q from the error map, and the cumulative sums the draws invert."""
        e = self.err.pow(self.power) if self.power != 1 else self.err
        self.q = e.mul(self.share).add_((float(e.mean()) + 1e-12) * (1 - self.share))  # > 0 everywhere
        self.col_cdf = self.q.cumsum(1)
        self.row_mass = self.col_cdf[:, -1].double()
        self.row_cdf = self.row_mass.cumsum(0)

    def draw(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next draw; `limit` (the draws its caller will still take) keeps the draws made ahead within it."""
        if not self.ahead:
            self._draw_ahead(limit)
        return self.ahead.pop()

    def _draw_ahead(self, limit: int | None) -> None:
        # Weighing the whole map takes ~8 ms at 768x512, a tenth of a step; a step changes 1/64 of it, so the
        # weights are refreshed every `refresh` draws (each draw's loss weights are from the map it drew from).
        # The draws up to the next refresh are made at once: one by one, their small operations (with the fit's
        # gathers) took 0.66 ms a step on a 256x256 crop, at once 0.37 (NOTES.md round 40). Their random numbers
        # come in the one-by-one order, so the draws are the same, and `limit` keeps the generator's other users
        # (the restarts' weights) where they were.
        if self.draws % self.refresh == 0:
            self._weigh()
        n = self.refresh - self.draws % self.refresh
        n = max(1, min(n, limit or n, (1 << 22) // (self.rows * self.w)))  # col_cdf's gathered rows stay small
        self.draws += n
        r, k = self.rows, self.cols
        # Per draw: one offset for its rows, then one for each row's columns (systematic sampling).
        u = torch.rand(n, 1 + r, generator=self.gen, dtype=torch.float64).to(self.steps.device)
        total = self.row_cdf[-1]
        rows = torch.searchsorted(self.row_cdf, (u[:, :1] + self.steps[:r]) / r * total, right=True)
        rows.clamp_(max=self.h - 1)  # (n, R)
        within = ((u[:, 1:, None] + self.steps[:k]) / k * self.row_mass[rows][..., None]).float()
        cols = torch.searchsorted(self.col_cdf[rows.view(-1)], within.view(n * r, k), right=True)
        cols = cols.clamp_(max=self.w - 1).view(n, r, k)
        # 1 / (chance x pixels): the chance of pixel (r, c) in one draw is q[r, c] / total.
        weights = (total / (self.h * self.w)).float() / self.q[rows[..., None], cols]
        self.ahead = [(rows[i], cols[i], weights[i]) for i in range(n - 1, -1, -1)]  # popped from the end

    def observe(self, pixels: torch.Tensor, losses: torch.Tensor) -> None:
        """The step's loss at each drawn pixel: flat indices row * w + column, and the losses, (R, K); a pixel drawn
        twice has the same loss both times."""
        self.err.view(-1)[pixels] = losses.reshape(-1).clamp(min=0)  # log-cosh rounds to -1e-8 at 0
