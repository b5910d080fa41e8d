"""The post-filter (format versions 6-8): a small linear filter on the decoded image, fitted per image by least
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
D = 4 is 3x3 and D = 12 5x5), neighbours beyond the image edge replaced by the edge pixel. Version 8 has K sets of
coefficients, one per class of local activity (as video codecs' adaptive loop filters): a pixel's class is the
number of the file's K - 1 thresholds at or below its activity(), so flat areas and edges or texture each get
their own filter (+0.07-0.16 dB over one filter on 768x512 Kodak at 1.0 bpp, NOTES.md #140). The second differences
are nearly uncorrelated with the centre and with each other, so the least-squares coefficients are small and
survive coarse rounding (plain tap weights, equivalent in exact arithmetic, are large with opposite signs). The
filter belongs to the stored size: decoding at any other size evaluates the network alone.

The encoder's least-squares sums take numpy arrays, or on CUDA float64 torch tensors on the GPU (on_device()),
where the rest of the encode is: the same choices, the sums in another order.
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


def halo(dirs, classes: int = 1) -> int:
    """Rows of neighbours on each side that filtering a band needs: the offsets' reach, and 2 for the activity of
    a classified filter."""
    return max(radius(dirs), 2 if classes > 1 else 0)


def _activity(p):
    """activity() of the pixels inside a channel sum p padded by 2 on each side (numpy or torch, float64). One
    fixed order of operations, so that the encoder and the decoder compute the same bits."""
    lap = abs(2 * p[1:-1, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]) + abs(2 * p[1:-1, 1:-1] - p[:-2, 1:-1] - p[2:, 1:-1])
    h, w = lap.shape[0] - 2, lap.shape[1] - 2
    out = lap[:h, :w]
    for i, j in ((0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)):
        out = out + lap[i : i + h, j : j + w]
    return out


def _channel_sum(u):
    s = u[..., 0]
    for ch in range(1, u.shape[-1]):
        s = s + u[..., ch]
    return s


def _host(a) -> np.ndarray:
    """A numpy array of a (numpy, or a torch tensor on any device)."""
    return a if isinstance(a, np.ndarray) else a.cpu().numpy()


def activity(u):
    """(H, W) local activity of normalised samples u (H, W, C): the sum over the 3x3 neighbourhood of the absolute
    horizontal and vertical second differences of the channels' sum, edges repeated. numpy in, numpy out; a torch
    tensor in, a tensor on its device out (the same bits: the same float64 operations, one at a time)."""
    if isinstance(u, np.ndarray):
        return _activity(np.pad(_channel_sum(u.astype(np.float64)), 2, mode="edge"))
    import torch.nn.functional as F

    return _activity(F.pad(_channel_sum(u.double())[None, None], (2, 2, 2, 2), mode="replicate")[0, 0])


def classes(u, thresholds):
    """(H, W) class of each pixel of u: how many thresholds are at or below its activity (as activity(): numpy or
    a torch tensor, as u is)."""
    if isinstance(u, np.ndarray):
        return np.searchsorted(np.asarray(thresholds, np.float64), activity(u), side="right")
    import torch

    return torch.bucketize(activity(u), torch.tensor(thresholds, dtype=torch.float64, device=u.device), right=True)


def thresholds_for(u, count: int) -> tuple[float, ...]:
    """Up to count - 1 float32 thresholds that split u's pixels into `count` classes of about equal size (fewer
    where the quantiles coincide, as on a flat image)."""
    q = np.quantile(_host(activity(u)), np.arange(1, count) / count).astype(np.float32)
    return tuple(float(v) for v in np.unique(q[q > 0]))


def kernel(mix, taps, offset, dirs):
    """The filter as one convolution: (K C, C, 2r + 1, 2r + 1) weights and a (K C,) bias, class k's outputs at rows
    k C to k C + C - 1 (torch, float64 arithmetic)."""
    import torch

    kc, c = mix.shape
    d = len(dirs)
    r = radius(dirs)
    t = taps.double().reshape(kc, c, d)
    k = torch.zeros(kc, c, 2 * r + 1, 2 * r + 1, dtype=torch.float64, device=mix.device)
    for j, (di, dj) in enumerate(dirs):
        k[:, :, r + di, r + dj] += t[:, :, j]
        k[:, :, r - di, r - dj] += t[:, :, j]
    eye = torch.eye(c, dtype=torch.float64, device=mix.device).repeat(kc // c, 1)
    k[:, :, r, r] += mix.double() - 2 * t.sum(2) + eye
    return k, offset.double()


def apply(x, weight, bias, thresholds=()):
    """Filter the middle rows of x (torch, (rows + 2 h, W, C) normalised samples, h = halo(); the h halo rows on
    each side are the image's neighbours, edge rows repeated at its top and bottom) with kernel()'s weight and
    bias, each pixel by its class's filter. Returns (rows, W, C), unclamped. One convolution (columns padded by
    repeating the edge ones): 5x fewer passes over the band than the second differences one by one."""
    import torch
    import torch.nn.functional as F

    r = weight.shape[-1] // 2
    c = x.shape[2]
    h = max(r, 2) if thresholds else r
    rows, width = x.shape[0] - 2 * h, x.shape[1]
    planes = F.pad(x[h - r : h + rows + r].permute(2, 0, 1)[None], (r, r, 0, 0), mode="replicate")
    out = F.conv2d(planes, weight.to(x.dtype), bias.to(x.dtype))[0]  # (K C, rows, W)
    if thresholds:
        s = _channel_sum(x[h - 2 : h + rows + 2].double())
        act = _activity(F.pad(s[None, None], (2, 2, 0, 0), mode="replicate")[0, 0])
        cls = torch.bucketize(act, torch.tensor(thresholds, dtype=torch.float64, device=x.device), right=True)
        out = out.view(-1, c, rows, width).gather(0, cls.expand(1, c, rows, width))[0]
    return out.permute(1, 2, 0)  # (rows, W, C)


def _columns(u, r0: int, r1: int, dirs, step: int = 1):
    """The least-squares design of image rows r0, r0 + step, ... below r1, one column per pixel: the channels,
    their second differences, a constant ((k, pixels)).
    Each row of it is one channel's plane shifted, written in one pass from slices of the band's planes padded by
    their edge pixels: 5x faster than rows of k values a pixel (0.58 against 0.12 s for a 768x512 image's 40
    offsets), and 4x faster again than gathering clipped columns and stacking them; the same values. u: numpy, or a
    float64 torch tensor (the design is then a tensor on its device)."""
    h, w, c = u.shape
    rad = radius(dirs)
    d = len(dirs)
    n = len(range(r0, r1, step))
    shape = (c + c * d + 1, n, w)
    if isinstance(u, np.ndarray):
        x = np.ascontiguousarray(u[np.clip(np.arange(r0 - rad, r1 + rad), 0, h - 1)].transpose(2, 0, 1))
        if rad:
            x = np.pad(x, ((0, 0), (0, 0), (rad, rad)), mode="edge")
        out, add = np.empty(shape), np.add
    else:
        import torch

        x = u[torch.arange(r0 - rad, r1 + rad, device=u.device).clamp(0, h - 1)].permute(2, 0, 1)
        if rad:
            x = torch.cat([x[:, :, :1].expand(-1, -1, rad), x, x[:, :, -1:].expand(-1, -1, rad)], 2)
        out, add = torch.empty(shape, dtype=u.dtype, device=u.device), torch.add
    # [channels | for each channel c', its D differences | 1], matching taps[c, c' * D + d]
    centre = x[:, rad : rad + r1 - r0 : step, rad : rad + w]
    out[:c] = centre
    twice = 2 * centre
    for j, (di, dj) in enumerate(dirs):
        plus = x[:, rad + di : rad + di + r1 - r0 : step, rad + dj : rad + dj + w]
        minus = x[:, rad - di : rad - di + r1 - r0 : step, rad - dj : rad - dj + w]
        rows = out[c + j : c + c * d : d]
        add(plus, minus, out=rows)
        rows -= twice
    out[-1] = 1
    return out.reshape(shape[0], n * w)


def normal_equations(u, target, dirs, cls=None, count: int = 1, band_pixels: int = 1 << 16, step: int = 1):
    """The least-squares problem's Gram matrices (K, k, k) and right-hand sides (K, k, C), one per class, for
    decoded samples u and the target, both (H, W, C) in [0, 1]; cls: (H, W) classes in [0, count) or None (one
    class); over every step-th row (row_step()). Summed band by band so that memory stays bounded for any image
    size. u, target and cls may be torch tensors (float64, and cls integer) on one device, where the sums are made
    (on_device()); the result is numpy."""
    h, w, c = u.shape
    k = c + c * len(dirs) + 1
    if isinstance(u, np.ndarray):
        gram, cross = np.zeros((count, k, k)), np.zeros((count, k, c))
    else:
        import torch

        gram, cross = (torch.zeros(s, dtype=torch.float64, device=u.device) for s in ((count, k, k), (count, k, c)))
    rows = max(1, band_pixels // w) * step
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        a = _columns(u, r0, r1, dirs, step)
        y = (target[r0:r1:step] - u[r0:r1:step]).reshape(-1, c)
        if cls is None:
            gram[0] += a @ a.T
            cross[0] += a @ y
            continue
        # The band's pixels grouped by class in their own order (a stable sort): each class a slice, the same rows
        # as a mask would take, without a pass over the band per class (split() has 48 classes).
        order, ends = _by_class(cls[r0:r1:step].reshape(-1), count)
        a, y = a[:, order], y[order]
        for j in range(count):
            m = slice(ends[j], ends[j + 1])
            gram[j] += a[:, m] @ a[:, m].T
            cross[j] += a[:, m] @ y[m]
    return _host(gram), _host(cross)


def _by_class(band, count: int):
    """The order that groups a band's pixels by class, stably, and where each class's run of it ends."""
    if isinstance(band, np.ndarray):
        order = np.argsort(band, kind="stable")
        return order, np.searchsorted(band[order], np.arange(count + 1))
    import torch

    ordered, order = torch.sort(band, stable=True)
    return order, torch.searchsorted(ordered, torch.arange(count + 1, device=band.device)).tolist()


def on_device(u: np.ndarray, target: np.ndarray, device: str):
    """u and target as float64 torch tensors on a CUDA device, where normal_equations(), split(), select(), fit()
    and squared_errors() then do their sums (the encoder's post-filter stage: at 768x512 ~1.5 s of numpy on a
    2-core CPU, the rest of the encode being on the GPU); on any other device, the numpy arrays themselves."""
    import torch

    if torch.device(device).type != "cuda":
        return u, target
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device, torch.float64) for a in (u, target))


def _least_squares(g, x):
    """The solution of g coef = x. A whisper of ridge: a flat image (or class) has a singular Gram matrix (its
    differences are all zero)."""
    k = g.shape[-1]
    return np.linalg.solve(g + np.eye(k) * (1e-9 * np.trace(g) / k + 1e-12), x)


def _solve(gram, cross, c: int, n_dirs: int, chosen):
    """(mix, taps, offset), each class's rows stacked, and the squared error removed, from the normal equations of
    `n_dirs` offsets restricted to the offsets `chosen` (indices) among them."""
    cols = [*range(c), *(c + ch * n_dirs + d for ch in range(c) for d in chosen), c + c * n_dirs]
    coefs, gain = [], 0.0
    for g, x in zip(gram[:, cols][:, :, cols], cross[:, cols]):
        coef = _least_squares(g, x)  # (k, c)
        coefs.append(coef)
        gain += float(np.sum(coef * x))
    mix, taps, offset = (np.concatenate([co[part].T for co in coefs]) for part in (slice(0, c), slice(c, -1), -1))
    return (mix, taps, offset), gain


def solve(gram, cross):
    """The least-squares (mix, taps, offset) of normal_equations()' sums (all their offsets)."""
    c = cross.shape[2]
    n_dirs = (gram.shape[1] - 1 - c) // c
    return _solve(gram, cross, c, n_dirs, range(n_dirs))[0]


def fit(u: np.ndarray, target: np.ndarray, dirs, cls=None, count: int = 1, band_pixels: int = 1 << 16):
    """The least-squares (mix, taps, offset) for decoded samples u and the target, both (H, W, C) in [0, 1], and
    pixel classes cls in [0, count) (None: one class)."""
    return solve(*normal_equations(u, target, dirs, cls, count, band_pixels))


def removed_error(gram, cross, candidates) -> np.ndarray:
    """The summed squared error each candidate filter (mix, taps, offset) removes from the unrounded, unclamped
    output, from normal_equations()' sums: sum over classes of 2 b.x - b'Gb for its coefficients b. Exact, and
    a few products of k x k matrices where squared_errors() is a pass over the image per candidate."""
    c = cross.shape[2]
    out = np.zeros(len(candidates))
    for i, f in enumerate(candidates):
        coef = _coef(*f)
        for j, (g, x) in enumerate(zip(gram, cross)):
            b = coef[:, j * c : (j + 1) * c]
            out[i] += 2 * np.sum(b * x) - np.sum(b * (g @ b))
    return out


def select(u: np.ndarray, target: np.ndarray, count: int, cls=None, n_classes: int = 1, band_pixels: int = 1 << 14,
           step: int = 1):
    """The `count` offsets of OFFSETS whose least-squares filters (one per class of cls) remove the most error,
    chosen one at a time (forward selection on the normal equations of all 40), and those filters: (offsets,
    (mix, taps, offset)).

    Which neighbours help depends on the image (its textures' directions, the network's ringing): on 256x256
    crops the selected 12 removed as much error as 14-16 fixed ones (NOTES.md #139). The filter is applied to the
    very pixels it is fitted to, so the choice cannot overfit beyond the coefficients' own ~1e-4 dB."""
    c = u.shape[2]
    n = len(OFFSETS)
    gram, cross = normal_equations(u, target, OFFSETS, cls, n_classes, band_pixels, step)
    chosen: list[int] = []
    for _ in range(min(count, n)):
        gains = {i: _solve(gram, cross, c, n, chosen + [i])[1] for i in range(n) if i not in chosen}
        chosen.append(max(gains, key=lambda i: (gains[i], -i)))  # ties: the nearer offset
    chosen.sort()
    return tuple(OFFSETS[i] for i in chosen), _solve(gram, cross, c, n, chosen)[0]


def split(u: np.ndarray, target: np.ndarray, dirs, count: int, bins: int = 48, step: int = 1) -> tuple[float, ...]:
    """Up to count - 1 thresholds whose classes' least-squares filters on the offsets `dirs` remove the most error,
    among the splits of u's activity at its 1/bins quantiles (float32, > 0, as the file stores them).

    Equal-sized classes (thresholds_for) put the boundary where the pixels are, not where the network's errors
    change: on 768x512 Kodak decodes the best split removed up to 0.04 dB more (NOTES.md #141). The normal equations
    are summed once per fine bin; a class of consecutive bins sums theirs, and dynamic programming over the bins
    finds the best split exactly. The equal-sized split (bins a multiple of count) is among those searched."""
    edges = thresholds_for(u, bins)
    n = len(edges) + 1
    count = min(count, n)
    if count < 2:
        return ()
    gram, cross = normal_equations(u, target, dirs, classes(u, edges), n, step=step)
    gram, cross = (np.concatenate([np.zeros_like(a[:1]), np.cumsum(a, 0)]) for a in (gram, cross))
    gain = np.zeros((n + 1, n + 1))  # gain[a, b]: error removed by one filter on bins a .. b - 1
    for a in range(n):
        for b in range(a + 1, n + 1):
            x = cross[b] - cross[a]
            gain[a, b] = float(np.sum(_least_squares(gram[b] - gram[a], x) * x))
    best = gain[0].copy()  # best[b]: the most error k classes remove on bins 0 .. b - 1
    starts = []
    for k in range(1, count):
        nxt, arg = np.full(n + 1, -np.inf), np.zeros(n + 1, int)
        for b in range(k + 1, n + 1):
            v = best[k:b] + gain[k:b, b]
            arg[b] = k + int(np.argmax(v))
            nxt[b] = v.max()
        best = nxt
        starts.append(arg)
    cuts, b = [], n
    for arg in reversed(starts):
        b = int(arg[b])
        cuts.append(b)
    return tuple(edges[i - 1] for i in sorted(cuts))


def clear_of_pixels(u: np.ndarray, thresholds, window: float = 1 / 256) -> tuple[float, ...]:
    """The thresholds, each moved to the middle of the widest gap between the pixels' activities among the
    `window` fraction of pixels on either side of it (float32, still increasing and > 0; left where no gap is
    wider than a float32 step).

    Decoders differ in the last bits of the network's values, so their activities do too (torch and the Triton
    kernel in its CPU interpreter by up to 2.2e-5 on a 768x512 Kodak file at 1.0 bpp), and a pixel that close to
    a threshold takes the next class's filter in one of them: up to 17 levels away, where the format allows one.
    Placed by split() alone, that file's thresholds had 12 pixels within 2.2e-5 and 2 pixels changed class between
    the two decoders; moved, none (NOTES.md #142), and moving a threshold past 0.4 % of the pixels changed PSNR by
    -0.0000 to +0.0035 dB."""
    a = np.sort(_host(activity(u)), axis=None)
    n, reach = a.size, max(1, int(window * a.size))
    out: list[float] = []
    for k, t in enumerate(thresholds):
        # gap j lies between a[j - 1] and a[j]: above the last threshold placed, below the next one as given
        above = int(np.searchsorted(a, out[-1], side="right")) + 1 if out else 1
        below = int(np.searchsorted(a, thresholds[k + 1])) - 1 if k + 1 < len(thresholds) else n - 1
        i = int(np.searchsorted(a, t))
        lo, hi = max(above, i - reach), min(below, i + reach, n - 1)
        if lo <= hi:
            j = lo + int(np.argmax(a[lo : hi + 1] - a[lo - 1 : hi]))
            mid = float(np.float32((a[j - 1] + a[j]) / 2))
            if a[j - 1] < mid < a[j]:
                t = mid
        out.append(float(t))
    return tuple(out)


def _outputs(u, r0: int, r1: int, dirs, coef, cls, n_out: int) -> np.ndarray:
    """(pixels, n_out, C) filtered rows [r0, r1) of u for coefficients coef (k, n_out * K * C; class k's block of
    each output at columns k C ...), each pixel by its class's (cls None: one class)."""
    c = u.shape[2]
    v = (_columns(u, r0, r1, dirs).T @ coef).reshape(-1, n_out, coef.shape[1] // (n_out * c), c)
    if cls is None:
        v = v[:, :, 0]
    elif isinstance(v, np.ndarray):
        v = np.take_along_axis(v, cls[r0:r1].reshape(-1, 1, 1, 1), 2)[:, :, 0]
    else:
        v = v.gather(2, cls[r0:r1].reshape(-1, 1, 1, 1).expand(-1, n_out, 1, c))[:, :, 0]
    return v + u[r0:r1].reshape(-1, 1, c)


def _coef(mix, taps, offset) -> np.ndarray:
    """(k, K C) coefficient columns of a filter, class by class (the design's row order of _columns)."""
    return np.concatenate([mix.T, taps.T, offset[None]], 0)


def apply_numpy(u: np.ndarray, mix, taps, offset, dirs, cls=None, band_pixels: int = 1 << 16) -> np.ndarray:
    """The filter in float64 over a whole (H, W, C) image with pixel classes cls (the encoder's measurements),
    unclamped."""
    h, w, c = u.shape
    out = np.empty_like(u)
    rows = max(1, band_pixels // w)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        out[r0:r1] = _outputs(u, r0, r1, dirs, _coef(mix, taps, offset), cls, 1).reshape(r1 - r0, w, c)
    return out


def squared_errors(u, target, candidates, peak: int, dirs, cls=None, band_pixels: int = 1 << 16) -> np.ndarray:
    """Summed squared error against the target of the rounded output, at P = peak, of each candidate filter
    (mix, taps, offset) on the offsets `dirs` with pixel classes cls: each band's design is built once for all of
    them (the encoder's step search). u, target and cls may be torch tensors on one device (on_device())."""
    h, w, c = u.shape
    coef = np.concatenate([_coef(*f) for f in candidates], 1)  # (k, n K C)
    rows = max(1, band_pixels // w)
    if not isinstance(u, np.ndarray):
        import torch

        coef, total = torch.from_numpy(coef).to(u.device), 0
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            v = _outputs(u, r0, r1, dirs, coef, cls, len(candidates))
            err = (v.clip(0, 1) * peak + 0.5).floor() / peak - target[r0:r1].reshape(-1, 1, c)
            total = total + (err * err).sum((0, 2))
        return total.cpu().numpy()
    out = np.zeros(len(candidates))
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        v = _outputs(u, r0, r1, dirs, coef, cls, len(candidates))
        err = np.floor(np.clip(v, 0, 1) * peak + 0.5) / peak - target[r0:r1].reshape(-1, 1, c)
        out += np.einsum("ijk,ijk->j", err, err)
    return out


# The encoder chooses the neighbours (select(), 40 offsets) and the class thresholds (split()) on every s-th row
# of an image of s x SELECT_PIXELS pixels or more, then fits the coefficients on all of them. On 16 effort-1 files
# of 768x512 Kodak images (0.3 and 1.0 bpp) every 2nd row gave -0.0004 dB on the mean (-0.018 ... +0.013) for 0.77x
# the post-filter's time, every 3rd -0.003 (NOTES.md #201).
SELECT_PIXELS = 3 << 16


def row_step(height: int, width: int) -> int:
    """The row step s of the encoder's choices for an image (SELECT_PIXELS)."""
    return max(1, height * width // SELECT_PIXELS)
