"""The post-filter (format versions 6-7): a small linear filter on the decoded image, fitted per image by least
squares.

A sine network's errors are smooth, spatially and across channels: ringing beside edges, a slightly soft or
slightly over-sharp texture, the same error in R, G and B. A point-symmetric filter on a few neighbours that mixes
the channels corrects part of it: +0.15-0.26 dB on 256x256 Kodak crops at 1.0 bpp, +0.08-0.15 at 0.3 bpp for a 3x3
one (the ideal least-squares filter of each decoded file; benchmarks/NOTES.md #138), for ~50 bytes. It cannot be
trained with the network, whose steps see a strided sub-grid with no neighbours, so the encoder fits it to the
finished network's decode, where the least-squares solution is exact.

On normalised samples u = value / P in [0, 1] (P the peak, 255 or 65535), channel c of the output is

    u_c + sum_c' mix[c, c'] u_c' + sum_c' sum_d taps[c, c', d] (u_c'(p + o_d) + u_c'(p - o_d) - 2 u_c'(p)) + offset[c]

for D offsets o_d of OFFSETS, the file's choice (version 7: any of the 40 within 4 pixels; version 6: the first D,
D = 4 is 3x3 and D = 12 5x5), neighbours beyond the image edge replaced by the edge pixel. The second differences
are nearly uncorrelated with the centre and with each other, so the least-squares coefficients are small and
survive coarse rounding (plain tap weights, equivalent in exact arithmetic, are large with opposite signs). The
filter belongs to the stored size: decoding at any other size evaluates the network alone.
"""

from __future__ import annotations

import numpy as np

# (row, column) offsets, nearest first; o and -o are one pair (the filter is point-symmetric). Version 6 uses the
# first D; version 7 any subset of all 40 within 4 pixels, as a bitmask (bit i: OFFSETS[i]).
DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1), (0, 2), (2, 0), (1, 2), (2, 1), (1, -2), (2, -1), (2, 2), (2, -2))
OFFSETS = DIRECTIONS + tuple(
    sorted(
        ((i, j) for i in range(5) for j in range(-4, 5) if (i or j > 0) and max(abs(i), abs(j)) > 2),
        key=lambda o: (max(abs(o[0]), abs(o[1])), o[0] ** 2 + o[1] ** 2, o),
    )
)


def directions(mask: int) -> tuple[tuple[int, int], ...]:
    """The offsets of a file's mask, in OFFSETS order (the order of the taps tensor's columns)."""
    return tuple(o for i, o in enumerate(OFFSETS) if mask >> i & 1)


def mask_of(dirs) -> int:
    """The mask of a set of OFFSETS (the inverse of directions())."""
    return sum(1 << OFFSETS.index(o) for o in dirs)


def radius(dirs) -> int:
    """Rows (and columns) of neighbours the offsets reach on each side."""
    return max((max(abs(i), abs(j)) for i, j in dirs), default=0)


def kernel(mix, taps, offset, dirs):
    """The filter as one convolution: (C, C, 2r + 1, 2r + 1) weights and a (C,) bias (torch, float64 arithmetic)."""
    import torch

    c = mix.shape[0]
    d = len(dirs)
    r = radius(dirs)
    t = taps.double().reshape(c, c, d)
    k = torch.zeros(c, c, 2 * r + 1, 2 * r + 1, dtype=torch.float64, device=mix.device)
    for j, (di, dj) in enumerate(dirs):
        k[:, :, r + di, r + dj] += t[:, :, j]
        k[:, :, r - di, r - dj] += t[:, :, j]
    k[:, :, r, r] += mix.double() - 2 * t.sum(2) + torch.eye(c, dtype=torch.float64, device=mix.device)
    return k, offset.double()


def apply(x, weight, bias):
    """Filter the middle rows of x (torch, (rows + 2 r, W, C) normalised samples; the r halo rows on each side
    are the image's neighbours, edge rows repeated at its top and bottom) with kernel()'s weight and bias. Returns
    (rows, W, C), unclamped. One convolution (columns padded by repeating the edge ones): 5x fewer passes over the
    band than the second differences one by one."""
    import torch.nn.functional as F

    r = weight.shape[-1] // 2
    planes = F.pad(x.permute(2, 0, 1)[None], (r, r, 0, 0), mode="replicate")  # (1, C, rows + 2r, W + 2r)
    return F.conv2d(planes, weight.to(x.dtype), bias.to(x.dtype))[0].permute(1, 2, 0)  # (rows, W, C)


def _columns(u: np.ndarray, r0: int, r1: int, dirs) -> np.ndarray:
    """Least-squares design rows of image rows [r0, r1): the channels, their second differences, a constant."""
    h, w, c = u.shape
    rad = radius(dirs)
    rows = np.clip(np.arange(r0 - rad, r1 + rad), 0, h - 1)
    x = u[rows]
    cols = np.arange(w)
    centre = x[rad : rad + r1 - r0]
    feats = [centre]
    for di, dj in dirs:
        plus = x[rad + di : rad + di + r1 - r0][:, np.clip(cols + dj, 0, w - 1)]
        minus = x[rad - di : rad - di + r1 - r0][:, np.clip(cols - dj, 0, w - 1)]
        feats.append(plus + minus - 2 * centre)
    n = (r1 - r0) * w
    # [channels | for each channel c', its D differences | 1], matching taps[c, c' * D + d]
    lap = np.stack(feats[1:], -1).reshape(n, c * len(dirs)) if dirs else np.zeros((n, 0))
    return np.concatenate([centre.reshape(n, c), lap, np.ones((n, 1))], 1)


def normal_equations(u: np.ndarray, target: np.ndarray, dirs, band_pixels: int = 1 << 16):
    """The least-squares problem's Gram matrix and right-hand sides for decoded samples u and the target, both
    (H, W, C) in [0, 1], summed band by band so that memory stays bounded for any image size."""
    h, w, c = u.shape
    k = c + c * len(dirs) + 1
    gram, cross = np.zeros((k, k)), np.zeros((k, c))
    rows = max(1, band_pixels // w)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        a = _columns(u, r0, r1, dirs)
        gram += a.T @ a
        cross += a.T @ (target[r0:r1] - u[r0:r1]).reshape(-1, c)
    return gram, cross


def _solve(gram, cross, c: int, n_dirs: int, chosen):
    """(mix, taps, offset) and the squared error removed, from the normal equations of `n_dirs` offsets restricted
    to the offsets `chosen` (indices) among them."""
    cols = [*range(c), *(c + ch * n_dirs + d for ch in range(c) for d in chosen), c + c * n_dirs]
    g, x = gram[np.ix_(cols, cols)], cross[cols]
    k = len(cols)
    # A whisper of ridge: a flat image has a singular Gram matrix (its differences are all zero).
    coef = np.linalg.solve(g + np.eye(k) * (1e-9 * np.trace(g) / k + 1e-12), x)  # (k, c)
    return (coef[:c].T.copy(), coef[c:-1].T.copy(), coef[-1].copy()), float(np.sum(coef * x))


def fit(u: np.ndarray, target: np.ndarray, dirs, band_pixels: int = 1 << 16):
    """The least-squares (mix, taps, offset) for decoded samples u and the target, both (H, W, C) in [0, 1]."""
    gram, cross = normal_equations(u, target, dirs, band_pixels)
    return _solve(gram, cross, u.shape[2], len(dirs), range(len(dirs)))[0]


def select(u: np.ndarray, target: np.ndarray, count: int, band_pixels: int = 1 << 14):
    """The `count` offsets of OFFSETS whose least-squares filter removes the most error, chosen one at a time
    (forward selection on the normal equations of all 40), and that filter: (offsets, (mix, taps, offset)).

    Which neighbours help depends on the image (its textures' directions, the network's ringing): on 256x256
    crops the selected 12 removed as much error as 14-16 fixed ones (NOTES.md #139). The filter is applied to the
    very pixels it is fitted to, so the choice cannot overfit beyond the coefficients' own ~1e-4 dB."""
    c = u.shape[2]
    n = len(OFFSETS)
    gram, cross = normal_equations(u, target, OFFSETS, band_pixels)
    chosen: list[int] = []
    for _ in range(min(count, n)):
        gains = {i: _solve(gram, cross, c, n, chosen + [i])[1] for i in range(n) if i not in chosen}
        chosen.append(max(gains, key=lambda i: (gains[i], -i)))  # ties: the nearer offset
    chosen.sort()
    return tuple(OFFSETS[i] for i in chosen), _solve(gram, cross, c, n, chosen)[0]


def apply_numpy(u: np.ndarray, mix, taps, offset, dirs, band_pixels: int = 1 << 16) -> np.ndarray:
    """The filter in float64 over a whole (H, W, C) image (the encoder's measurements), unclamped."""
    h, w, c = u.shape
    out = np.empty_like(u)
    coef = np.concatenate([mix.T, taps.T, offset[None]], 0)
    rows = max(1, band_pixels // w)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        out[r0:r1] = u[r0:r1] + (_columns(u, r0, r1, dirs) @ coef).reshape(r1 - r0, w, c)
    return out


def squared_errors(u: np.ndarray, target: np.ndarray, candidates, peak: int, dirs,
                   band_pixels: int = 1 << 16) -> np.ndarray:
    """Summed squared error against the target of the rounded output, at P = peak, of each candidate filter
    (mix, taps, offset) on the offsets `dirs`: each band's design is built once for all of them (the encoder's
    step search)."""
    h, w, c = u.shape
    coef = np.concatenate([np.concatenate([m.T, t.T, o[None]], 0) for m, t, o in candidates], 1)  # (k, C * n)
    out = np.zeros(len(candidates))
    rows = max(1, band_pixels // w)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        v = (_columns(u, r0, r1, dirs) @ coef).reshape(-1, len(candidates), c) + u[r0:r1].reshape(-1, 1, c)
        err = np.floor(np.clip(v, 0, 1) * peak + 0.5) / peak - target[r0:r1].reshape(-1, 1, c)
        out += np.einsum("ijk,ijk->j", err, err)
    return out
