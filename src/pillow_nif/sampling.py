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
    """Draws (rows (R,), cols (R, K)) and their loss weights (R, K); `observe` records the step's per-pixel losses.

    With `count`, B images of a stack at once (batch.py): rows (B, R), cols and weights (B, R, K), each image from
    its own error map and all from the same random numbers. A draw takes the same count of them whatever the map,
    so each image's draws are those its own encode would make, and the generator moves on as one image's would.
    """

    def __init__(self, h: int, w: int, rows: int, cols: int, share: float, power: float, device, generator,
                 refresh: int = 16, count: int | None = None):
        self.h, self.w, self.rows, self.cols = h, w, rows, cols
        self.share, self.power, self.refresh, self.count = share, power, refresh, count
        self.gen = generator
        # Until measured, every pixel alike: the first draws are uniform. (H, W), or (B, H, W) with `count`.
        self.err = torch.ones(*([count] if count else []), h, w, device=device)
        self.steps = torch.arange(max(rows, cols), device=device, dtype=torch.float64)
        self.images = torch.arange(count or 1, device=device)
        self.draws = 0  # made so far, including those made ahead
        self.ahead: list = []

    def _weigh(self) -> None:
        """Each pixel's weight q from the error map, and the cumulative sums the draws invert (per image)."""
        err = self.err.view(-1, self.h, self.w)
        e = err.pow(self.power) if self.power != 1 else err
        # The uniform part from each image's mean, in float64 as a Python float would be, then rounded once.
        mean = ((e.mean((1, 2), keepdim=True).double() + 1e-12) * (1 - self.share)).float()
        self.q = e.mul(self.share).add_(mean)  # > 0 everywhere
        self.col_cdf = self.q.cumsum(2)
        self.row_mass = self.col_cdf[:, :, -1].double()
        self.row_cdf = self.row_mass.cumsum(1)

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
        b, r, k = len(self.images), self.rows, self.cols
        n = self.refresh - self.draws % self.refresh
        n = max(1, min(n, limit or n, (1 << 22) // (b * r * self.w)))  # col_cdf's gathered rows stay small
        self.draws += n
        # Per draw: one offset for its rows, then one for each row's columns (systematic sampling).
        u = torch.rand(n, 1 + r, generator=self.gen, dtype=torch.float64).to(self.steps.device)
        total = self.row_cdf[:, -1:]  # (B, 1)
        rows = torch.searchsorted(self.row_cdf, ((u[:, :1] + self.steps[:r]) / r).view(1, -1) * total, right=True)
        rows = rows.clamp_(max=self.h - 1).view(b, n, r)
        mass = self.row_mass.gather(1, rows.view(b, -1)).view(b, n, r, 1)
        within = ((u[:, 1:, None] + self.steps[:k]) / k * mass).float()  # (B, n, R, K)
        ib = self.images.view(b, 1)
        cols = torch.searchsorted(self.col_cdf[ib, rows.view(b, -1)], within.view(b, n * r, k), right=True)
        cols = cols.clamp_(max=self.w - 1).view(b, n, r, k)
        # 1 / (chance x pixels): the chance of pixel (r, c) in one draw is q[r, c] / total.
        q = self.q[ib.view(b, 1, 1, 1), rows[..., None], cols]  # the drawn pixels' weights
        weights = (total / (self.h * self.w)).float().view(b, 1, 1, 1) / q
        one = self.count is None  # a single image's draws drop the image axis
        self.ahead = [(rows[0, i], cols[0, i], weights[0, i]) if one else (rows[:, i], cols[:, i], weights[:, i])
                      for i in range(n - 1, -1, -1)]  # popped from the end

    def observe(self, pixels: torch.Tensor, losses: torch.Tensor) -> None:
        """The step's loss at each drawn pixel: flat indices row * w + column, (N,), or (B, N) with `count`, and the
        losses, N a row (any shape); a pixel drawn twice has the same loss both times."""
        b = len(self.images)
        # log-cosh rounds to -1e-8 at 0
        self.err.view(b, -1).scatter_(1, pixels.view(b, -1), losses.reshape(b, -1).clamp(min=0))
