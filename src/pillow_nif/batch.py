"""Batch encoding: fit many images at once, one stacked network per group of like images.

Images that get the same architecture and size (hence the same sampling stride and step shape) form a
group. A group's B networks live in one `StackedNIF`, every parameter a (B, ...) tensor, and train
together: one forward of batched matmuls per step, one loss (the sum of the per-image losses, so each
image's gradient is exactly its own), one optimiser over the stacked tensors. Adam's state is per element
and Muon orthogonalises each image's matrix of a (B, out, in) stack on its own, so the B fits are
independent; what is shared is the per-step overhead (Python, dispatch, optimizer), which dominates
small networks on a CPU and launches on a GPU.

Each image follows the one-at-a-time recipe of fit.py with the same seed: the same initial weights,
the same restart noise (scaled by its own weights), its own best-state
tracking across restart stages; rate control per image; quantisation-aware tuning for the group at
once, each image at its own quantisation steps; then each image's file. Files are in encode_image's format
with its header, within the same budget, and near its PSNR (4 crops of 256x256 at effort 5: +0.04 / +0.01 dB
on the mean at 0.3 / 0.6 bpp, −0.09 … +0.14 per file; NOTES.md #162); not bit-identical (the stacked network
scales by omega inside the matmuls, and batched matmuls may round differently), but deterministic for a seed.
Where a step samples part of the image, each image draws its step's pixels by its own error as encode_image
does (sampling.py): each image from its own error map, all from the same random numbers, so each image's draws
are those its own encode would make from its map.

Measured (benchmarks/encode_speed.py, 2-core CPU, OMP_NUM_THREADS=1, effort 1, 4 Kodak crops at 0.6 bpp):
a training step of 4 networks took 9.1 ms as hand-written batched matmuls, 10.4 ms with torch.func.vmap
over NIF.forward_grid (stack_module_state + functional_call), 12.7 ms as 4 plain steps (128 px crops);
69.9 / 74.2 / 93.8 ms at 256 px. encode_many ran 1.59x (128 px) and 1.50x (256 px) the images/s of one
encode per image. The CPU is bound by elementwise passes over the activations, which batching does not
reduce; on a GPU, where small networks leave it idle between launches, the gain is expected to be larger.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import types
from typing import Callable

import numpy as np

import torch
from torch import nn

from . import fit, tiles
from .bitstream import METADATA, Architecture, Header
from .imaging import as_image, fill_hidden, split_constant_alpha
from .model import axis_columns, encode_axis, sin_of_product
from .subgrid import as_slice

# Floats of saved activations one group may hold per step (about 4 per hidden unit per sampled
# pixel): groups larger than this are split, so a long list of big images cannot exhaust memory.
_GROUP_FLOATS = {"cpu": 1 << 27, "cuda": 1 << 29}
MAX_GROUP = 65535  # networks in one stack: CUDA's limit on a grid's y and z


@dataclasses.dataclass
class _Job:
    """One image and what encode_image decides before fitting it (its pixels are read when its group runs)."""

    index: int
    image: object  # PIL image
    plan: fit.Plan
    eff: fit.Effort  # the level as it fits this image's size (fit.effort_for)

    @property
    def header(self) -> Header:
        return self.plan.header


def encode_many(images, **options) -> list[bytes]:
    """Encode several images with the same options; like-sized images are fitted together."""
    return [r.data for r in encode_batch(images, **options, measure=False)]


def encode_batch(images, bpp=None, quality=None, effort=5, device="auto", seed=0, progress=False,
                 icc_profile=None, exif=None, xmp=None, colour="auto", config: fit.FitConfig | None = None,
                 metadata: list[dict] | None = None, use_fused: bool = False,
                 on_result: Callable[[int, fit.EncodeResult], None] | None = None,
                 measure: bool = True, keep_alpha: bool = False, exact: bool = False) -> list[fit.EncodeResult]:
    """encode_image for a list of PIL images (or arrays), fitting like images together.

    Every option means what it means to encode_image and applies to every image; `metadata`, a list of
    dicts with keys icc_profile/exif/xmp, gives per-image metadata instead (as the CLI needs), and `bpp` may be a
    list of one bpp per image (as tiles.py shares a large image's bits out by the tiles' content).
    `use_fused` trains with the Triton sine-layer kernel (CUDA, or TRITON_INTERPRET=1): 2.2x slower than torch's
    step on an H200 (benchmarks/NOTES.md round 43), so off by default.
    `on_result(index, result)` is called as each image is done (groups finish in order of first image).
    `measure`: the results' PSNRs, as encode_image's (encode_many keeps only the bytes).
    `keep_alpha`: fit an alpha channel of one value too (tiles.py: a tile of a partly transparent image keeps the
    grid's mode), where encode_image stores its value alone (imaging.split_constant_alpha).
    `exact`: as encode_image's (tiles.py passes True: the whole image's hidden colours are filled already).
    """
    images = list(images)
    # one bpp per image: a list, tuple or 1-D array; an entry None takes quality's bpp, or the default
    each = list(bpp) if isinstance(bpp, (list, tuple)) or getattr(bpp, "ndim", 0) == 1 else None
    one = None if each is not None else bpp
    target_bpp, effort, device = fit.check_encode_options(one, quality, effort, device, seed, colour, exact,
                                                          progress)
    seed = int(seed)  # a NumPy integer too
    if each is not None:
        if len(each) != len(images):
            raise ValueError(f"bpp has {len(each)} entries for {len(images)} images")
        for b in each:
            fit.check_options(b)
    bpps = [target_bpp if b is None else float(b) for b in each] if each is not None else [target_bpp] * len(images)
    if use_fused and not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("use_fused needs CUDA (or TRITON_INTERPRET=1, for tests)")
    cfg = config or fit.FitConfig()
    if metadata is not None and len(metadata) != len(images):
        raise ValueError(f"metadata has {len(metadata)} entries for {len(images)} images")
    common = dict(icc_profile=icc_profile, exif=exif, xmp=xmp)
    # Every image is checked (mode, budget) before any fitting starts.
    if metadata is not None and any(set(m) - set(METADATA) for m in metadata):
        raise ValueError(f"metadata entries take the keys {', '.join(METADATA)}")
    images = [im if exact else fill_hidden(im) for im in map(as_image, images)]
    split = [(im, None) if keep_alpha else split_constant_alpha(im) for im in images]
    images = [im for im, _ in split]
    meta = [fit.metadata_of(im, **(metadata[i] if metadata is not None else common), alpha=alpha,
                            alpha_ends=not keep_alpha)  # tiles: the tiled file's own aEND covers them
            for i, (im, alpha) in enumerate(split)]
    # Images of one colour (an empty tile too) need no fitting (fit.constant_file).
    flat = {i: r for i, im in enumerate(images) if (r := fit.constant_result(im, meta[i], bpps[i], cfg)) is not None}
    bpps = [fit.quality_bpp(im, quality, meta[i], colour, cfg) if b is None and i not in flat else b
            for i, (im, b) in enumerate(zip(images, bpps))]
    # Images over cfg.tile_pixels are encoded one by one, each as its tiles fitted together (tiles.py).
    large = {i: tiles.plan_tiles(im, bpps[i], {k: v for k, v in meta[i].items() if v}, colour, cfg, effort)
             for i, im in enumerate(images) if i not in flat and fit.tile_grid(*im.size, cfg.tile_pixels) != (1, 1)}
    jobs = [_plan(i, im, bpps[i], colour, meta[i], cfg, effort) for i, im in enumerate(images)
            if i not in large and i not in flat]

    def replan(job: _Job, c: fit.FitConfig) -> fit.Plan:  # the plan of a refit (fit.refit)
        return _plan(job.index, job.image, bpps[job.index], colour, meta[job.index], c, effort).plan

    # One bar for the whole call: the tiled images' fits (each its own encode_batch, below) count into it too.
    tiled = {i: plan[3] for i, plan in large.items()}  # the steps of each one's tiles (tiles.plan_tiles)
    bar = fit._progress(progress, sum(fit.fit_work(j.header, j.eff, cfg) for j in jobs) + sum(tiled.values()))
    results: list[fit.EncodeResult | None] = [None] * len(images)
    for i, r in flat.items():
        results[i] = r
        if on_result is not None:
            on_result(i, r)
    try:
        with fit.on_device(device):  # where Triton launches and CUDA graphs capture
            for group in _groups(jobs, device):
                t0 = time.perf_counter()
                done = _encode_group(group, device, cfg, seed, use_fused, bar, measure, replan)
                seconds = (time.perf_counter() - t0) / len(group)  # the group's time, shared out evenly
                for job, r in zip(group, done):
                    r.seconds = seconds
                    results[job.index] = r
                    if on_result is not None:
                        on_result(job.index, r)
            for i in sorted(large):
                results[i] = tiles.encode_tiled(images[i], bpps[i], effort, device, seed, _forward(bar, tiled[i]),
                                                meta[i], colour, cfg, measure, large[i])
                if on_result is not None:
                    on_result(i, results[i])
    finally:
        bar.close()
    return results


def _forward(bar, counted: int) -> Callable[[int, int], None]:
    """A progress callable(done, total) for an inner call whose `counted` steps `bar` holds already: its steps go on
    `bar`, and so does any growth of its total (a refit's, fit.refit)."""
    seen = 0

    def fn(done: int, total: int) -> None:
        nonlocal seen, counted
        bar.total += total - counted
        counted = total
        bar.update(done - seen)
        seen = done

    return fn


def _plan(index: int, image, target_bpp: float, colour: str, meta: dict, cfg: fit.FitConfig, level: int) -> _Job:
    eff = fit.effort_for(level, *image.size, cfg)
    return _Job(index, image, fit.plan_encode(image, target_bpp, colour, meta, cfg, eff), eff)


def _arrays(job: _Job) -> tuple[np.ndarray, np.ndarray, int]:
    """(pixels in [0, 1], network-space target, peak value) of a job's image, as encode_image makes them."""
    from .colour import to_network_space
    from .imaging import prepare_image

    pixels, mode, maxval = prepare_image(job.image)
    assert pixels.shape == (job.header.height, job.header.width, job.header.channels) and mode == job.header.mode
    return pixels, to_network_space(pixels, job.header.colour), maxval


def _groups(jobs: list[_Job], device: str) -> list[list[_Job]]:
    """Jobs of equal (architecture, height, width), in order of first appearance, split to bound memory (one call's
    jobs of one size share their effort, fit.effort_for)."""
    by_key: dict[tuple, list[_Job]] = {}
    for j in jobs:
        by_key.setdefault((j.header.arch, j.header.height, j.header.width), []).append(j)
    out = []
    for (arch, h, w), js in by_key.items():
        stride = fit.step_stride(h, w, js[0].eff)  # as Fitter
        pixels = math.ceil(h / stride) * math.ceil(w / stride)
        units = sum(arch.widths) + sum(arch.mod_widths) + arch.channels
        per_image = max(1, 4 * pixels * units)  # saved activations of a training step
        size = max(1, _GROUP_FLOATS["cuda" if device.startswith("cuda") else "cpu"] // per_image)
        size = min(size, MAX_GROUP)  # the fused layer's grid has the stack on CUDA's z axis (kernels/sine_layer.py)
        out += [js[k : k + size] for k in range(0, len(js), size)]
    return out


def _encode_group(group: list[_Job], device: str, cfg: fit.FitConfig, seed: int, use_fused: bool, bar,
                  measure: bool, replan) -> list[fit.EncodeResult]:
    """encode_image for a group of like images: fit together, rate-control each, tune together, code each; an image
    whose network rounded badly is fitted again alone, as encode_image would (fit.refit; replan(job, cfg) is its
    plan for a config)."""
    eff = group[0].eff
    arrays = [_arrays(j) for j in group]
    gains = [fit.OutputGain.of(a[1], cfg) for a in arrays]
    fitter = BatchFitter([g.normalise(a[1]) for g, a in zip(gains, arrays)], group[0].header.arch, device, eff, cfg,
                         seed, use_fused)
    fit_mses = fitter.fit(lambda n: bar.update(n * len(group)))
    fitter.shift_output(np.concatenate([g.offsets for g in gains]))  # each network now fits gain x its target
    fit_pixels, codings, files = [], [], []
    scaled = [a[1] * g.gain for g, a in zip(gains, arrays)]  # what each network fits from here on
    targets = [torch.from_numpy(t).float().to(device) for t in scaled]
    for i, (job, (_, _, maxval)) in enumerate(zip(group, arrays)):
        model = fitter.model.unstack(i)
        fit_pixels.append(fit._render_model(model, job.header, maxval, gains[i].gain) if measure else None)
        data, coding = fit.quantise(model, targets[i], job.plan, cfg, eff)
        codings.append(coding)
        files.append(data)
    if eff.qat_stages:  # as fit.tune_and_code, the tuning for the whole group at once
        fit_states = [fitter.model.unstack(i).state_dict() for i in range(len(group))]
        fitter.tune(codings, lambda n: bar.update(n * len(group)))
        for i, job in enumerate(group):
            plan, model = job.plan, fitter.model.unstack(i)
            data = fit.tuned_file(model, plan, codings[i])
            if len(data) > plan.budget:  # rare: this image is quantised and tuned again alone, as encode_image would
                alone = fit.Fitter(scaled[i], job.header.arch, device, eff, cfg, seed)
                alone.model.load_state_dict(model.state_dict())
                data = fit.tune_and_code(alone, plan, codings[i], files[i], fit_states[i], tuned=True)
            files[i] = data
    results = []
    for i, (job, data, (pixels, _, maxval)) in enumerate(zip(group, files, arrays)):
        loss = fit.rounding_loss(data, fitter.model.unstack(i), targets[i], float(fit_mses[i]), fitter.mse_stride)
        data = fit.scale_output_steps(data, gains[i].gain)
        data = fit.add_alpha_ends(fit.add_post_filter(data, pixels, maxval, job.plan, device), pixels, device)
        data, fp, plan = fit.refit(data, fit_pixels[i], loss, job.plan, lambda c: replan(job, c), pixels, maxval,
                                   device, eff, cfg, seed, bar, measure)
        data, arch, fp = fit.no_worse_than_flat(data, pixels, maxval, plan, device, cfg, fp)
        results.append(fit.score(data, pixels, maxval, fp, device, 0.0, arch))
    return results


# ---- the stacked network -----------------------------------------------------------------------------


class StackedNIF(nn.Module):
    """B NIF networks of one architecture; each parameter is the (B, ...) stack of theirs.

    forward(ys, xs) is NIF.forward_grid for all B at once, as (len(ys), len(xs), B * C): image i's
    channels are columns i*C .. i*C+C-1, so fit.py's losses apply to the whole stack unchanged.
    Batched matmuls (torch.matmul / baddbmm) rather than torch.func.vmap (faster on the CPU, see the
    module's docstring); a constant period (omega without modulation, the modulation network's own omega
    and sigma) rides on the matmul as its alpha/beta instead of a pass over the activations (1.34x on a
    128 px step without modulation). `use_fused` runs the hidden sine layers through
    kernels/sine_layer.py (CUDA, or the interpreter in tests).
    """

    def __init__(self, models, use_fused: bool = False):
        super().__init__()
        self.arch: Architecture = models[0].arch
        self.count = len(models)
        self.use_fused = use_fused
        self.names = [n for n, _ in models[0].named_tensors()]
        per = [dict(m.named_tensors()) for m in models]
        self.stack = nn.ParameterList(
            nn.Parameter(torch.stack([p[n].detach() for p in per]).contiguous()) for n in self.names
        )

    def named_tensors(self):
        return list(zip(self.names, self.stack))

    def unstack(self, i: int):
        """Network i as a plain model.NIF (a copy)."""
        from .model import blank_nif

        model = blank_nif(self.arch, self.stack[0].device)
        with torch.no_grad():
            for (_, dst), src in zip(model.named_tensors(), self.stack):
                dst.copy_(src[i])
        return model

    def forward(self, ys, xs, weights: dict | None = None, cols=None):
        """(R, K, B * C) on a grid, ys (R,) and xs (K,) shared by all B, or on drawn pixels: ys (B, R), image i's
        rows, and xs (B, R, K), each row's own columns, or (`cols`) xs (W,), every column, and cols (B, R, K),
        each row's own columns as indices into xs."""
        t = weights if weights is not None else dict(self.named_tensors())
        a, bsz = self.arch, self.count
        hs, ws = ys.shape[-1], (xs if cols is None else cols).shape[-1]
        drawn = ys.dim() == 2
        sine = None
        if self.use_fused:
            from pillow_nif.kernels.sine_layer import sine_layer as sine

        def first(prefix, freqs, scale=1.0):  # scale * model.first_layer_grid, batched
            w, b = t[f"{prefix}.0.weight"], t[f"{prefix}.0.bias"]
            ycols, xcols = axis_columns(freqs, w.device)
            ey = encode_axis(ys.reshape(-1), freqs, a.pe_scale).view(*ys.shape, -1)
            ry = torch.baddbmm(b[:, None, :], ey.expand(bsz, -1, -1), w[:, :, ycols].transpose(1, 2),
                               beta=scale, alpha=scale)  # (B, R, width)
            ex = encode_axis(xs.reshape(-1), freqs, a.pe_scale)  # (B * R * K, or K or W, features)
            wx = w[:, :, xcols].transpose(1, 2) * scale
            if cols is not None:  # each column's terms once, gathered by each pixel
                rx = torch.matmul(ex, wx)  # (B, W, width)
                at = (cols.reshape(bsz, -1) + torch.arange(bsz, device=cols.device)[:, None] * len(xs)).view(-1)
                rx = rx.reshape(-1, rx.shape[-1]).index_select(0, at).view(bsz, hs, ws, -1)
            elif drawn:
                rx = torch.matmul(ex.view(bsz, hs * ws, -1), wx).view(bsz, hs, ws, -1)
            else:
                rx = torch.matmul(ex, wx)[:, None, :, :]
            return (ry[:, :, None, :] + rx).reshape(bsz, hs * ws, -1)

        def linear(prefix, i, h, scale=1.0):  # scale * (h W^T + b): the scale rides on the matmul
            w, b = t[f"{prefix}.{i}.weight"], t[f"{prefix}.{i}.bias"]
            return torch.baddbmm(b[:, None, :], h, w.transpose(1, 2), beta=scale, alpha=scale)

        def hidden(prefix, i, h, period):  # sin(period * (h W^T + b))
            if sine is not None:
                return sine(h, t[f"{prefix}.{i}.weight"].transpose(1, 2), t[f"{prefix}.{i}.bias"], period)
            if not isinstance(period, torch.Tensor):
                return torch.sin(linear(prefix, i, h, period))
            return sin_of_product(linear(prefix, i, h), period)

        if a.mod_widths:
            n = len(a.mod_widths)
            h = torch.sin(first("modulation", a.mod_freqs, a.mod_omega))
            for i in range(1, n):
                h = hidden("modulation", i, h, a.mod_omega)
            period = linear("modulation", n, h, a.mod_sigma) + a.omega  # (B, N, 1)
            h = sin_of_product(first("genesis", a.pe_freqs), period)
        else:
            period = a.omega
            h = torch.sin(first("genesis", a.pe_freqs, period))
        n = len(a.widths)
        for i in range(1, n):
            h = hidden("genesis", i, h, period)
        out = linear("genesis", n, h)  # (B, N, C)
        return out.reshape(bsz, hs, ws, -1).permute(1, 2, 0, 3).reshape(hs, ws, -1)


class _ImageView:
    """Image i of a StackedNIF seen as one NIF by fit.Fitter.restart (views: in-place edits land in the stack)."""

    def __init__(self, model, i: int):
        self._tensors = [(n, t[i]) for n, t in model.named_tensors()]

    def named_tensors(self):
        return self._tensors


class BatchFitter(fit.Fitter):
    """fit.Fitter over a stack of same-size images: the same sampling, schedule, restarts and stages.

    The target is the images side by side along channels, (H, W, B * C), so Fitter's sampling and
    losses apply unchanged; loss() is B times Fitter's (the sum of per-image losses), mse() and the
    best-state choice are per image.
    """

    def __init__(self, targets: list[np.ndarray], arch: Architecture, device: str, effort: fit.Effort,
                 cfg: fit.FitConfig, seed: int, use_fused: bool = False):
        self.count, self.channels = len(targets), targets[0].shape[2]  # before Fitter's new_sampler reads count
        super().__init__(np.concatenate(targets, axis=2), arch, device, effort, cfg, seed)
        # Fitter drew the initial weights from the seed, as it does for one image: every image starts there.
        self.model = StackedNIF([self.model] * self.count, use_fused).to(device)
        self.images = torch.arange(self.count, device=device)

    def new_sampler(self):
        """One sampler for the stack: each image's own error map, all drawing from the same random numbers."""
        return super().new_sampler(self.count)

    def predict(self, rows, cols, weights=None):
        """(prediction, target), (R, K, B * C): the stacked networks side by side, on the grid rows x cols
        or on each image's drawn pixels (rows (B, R), cols (B, R, K))."""
        if isinstance(rows, range):
            pred = self.model(*self.axes(rows, cols), weights)
            return pred, self.target[as_slice(rows), as_slice(cols)]
        if self.target.is_cuda:  # each pixel's own encoding: index_select's gradient sums with CUDA atomics, in a
            pred = self.model(*self.axes(rows, cols), weights)  # varying order (as subgrid.drawn_columns_gradient)
        else:  # each column's terms once, gathered: 35 against 43 ms a step (4 crops at 0.6 bpp, one thread)
            pred = self.model(*self.axes(rows, range(self.w)), weights, cols)
        flat = self.target.view(self.h * self.w, self.count, self.channels)
        return pred, flat[self.drawn_pixels.T, self.images].reshape(pred.shape)  # image i's targets at its pixels

    def loss(self, rows, cols, weights=None):
        """The sum of the images' losses, each as Fitter.loss gives it for its image alone."""
        if self.weights is None:  # the grid
            return self.count * super().loss(rows, cols, weights)
        pred, target = self.predict(rows, cols, weights)
        terms = fit.log_cosh_terms(pred - target).view(*pred.shape[:2], self.count, self.channels)
        self.sampler.observe(self.drawn_pixels, terms.detach().sum(3).permute(2, 0, 1))
        weighted = terms * self.weights.permute(1, 2, 0)[..., None]  # each image's pixels by its own chances
        self.terms = weighted.detach()  # image_losses: each image's estimate of its loss, as its own fit has
        return self.count * weighted.mean()

    def image_losses(self, loss):
        """Each image's share of the step's loss, so the collapse guard watches each image on its own."""
        return self.terms.reshape(-1, self.count, self.channels).mean((0, 2))

    def mse(self, weights=None) -> np.ndarray:
        """Per-image MSE over the image (every mse_stride-th row and column, as fit.Fitter.mse) in network units."""
        s = self.mse_stride
        cols = range(0, self.w, s)
        rows = max(1, (1 << 16) // (len(cols) * self.count)) * s
        total = torch.zeros(self.count, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for r0 in range(0, self.h, rows):
                band = range(r0, min(self.h, r0 + rows), s)
                d = self.model(*self.axes(band, cols), weights) - self.target[band.start : band.stop : s, ::s]
                total += (d * d).reshape(len(band), len(cols), self.count, self.channels).sum((0, 1, 3)).double()
        return total.cpu().numpy() / (len(range(0, self.h, s)) * len(cols) * self.channels)

    def clip_gradients(self):
        """fit.Fitter.clip_gradients per image (a stacked tensor's row i belongs to image i), so that one
        image's large gradient never scales another's step."""
        if not self.cfg.grad_clip:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        sq = sum(g.reshape(self.count, -1).square().sum(1) for g in grads)
        scale = (self.cfg.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(fit.per_image(scale, g))

    def restart(self, progress: float):
        """fit.Fitter.restart on each image from the same generator state: the noise one-at-a-time
        encoding with this seed draws, scaled by each image's own mean |w|."""
        start = self.gen.get_state()
        for i in range(self.count):
            self.gen.set_state(start)
            view = types.SimpleNamespace(torch=torch, cfg=self.cfg, gen=self.gen, model=_ImageView(self.model, i))
            fit.Fitter.restart(view, progress)

    def fit(self, tick):
        """Fitter.fit with per-image best states: an image whose stage made it worse goes back alone."""
        e = self.effort
        best = self._keep_best(self.mse(), None)  # from the initialisation, as Fitter.fit (a NaN stage is never kept)
        for stage in range(e.stages):
            if stage:
                self.restart(stage / max(1, e.stages - 1))
            self.run_stage(e.iters, self.stage_lr(stage), tick)
            best = self._keep_best(self.mse(), best)
        if self.polish_iters:
            self.run_stage(self.polish_iters, self.lr * self.cfg.polish_lr, tick)
            best = self._keep_best(self.mse(), best)
        return best[0]

    def tune(self, codings: list[list], tick):
        """fit._quantisation_aware_tuning's training for every image at once, each through a
        straight-through quantiser at its own steps (codings[i] per image); keeps each image's best."""
        from .quant import fake_quantize

        e = self.effort
        shape = lambda t: (self.count,) + (1,) * (t.dim() - 1)  # noqa: E731
        steps = [
            (torch.tensor([c[k].step for c in codings], device=self.device).reshape(shape(t)),
             torch.tensor([float(c[k].qmax) for c in codings], device=self.device).reshape(shape(t)))
            for k, (_, t) in enumerate(self.model.named_tensors())
        ]

        def quantised():
            return {n: fake_quantize(t, *steps[k]) for k, (n, t) in enumerate(self.model.named_tensors())}

        best = self._keep_best(self.mse(quantised()), None)
        for _ in range(e.qat_stages):
            self.run_stage(self.qat_iters, self.qat_lr, tick, quantised)
            best = self._keep_best(self.mse(quantised()), best, go_back=False)
        with torch.no_grad():
            for (_, t), b in zip(self.model.named_tensors(), best[1]):
                t.copy_(b)

    def _keep_best(self, mse: np.ndarray, best, go_back: bool = True):
        """Per image: the new weights become the best if their MSE is lower, else (go_back) the image goes
        back to its best, as in Fitter.fit (the tuning only goes back at its end). best: (mse, tensors)."""
        tensors = [t for _, t in self.model.named_tensors()]
        if best is None:
            return mse, [t.detach().clone() for t in tensors]
        better = mse < best[0]
        keep = torch.from_numpy(better).to(self.device)
        with torch.no_grad():
            for t, b in zip(tensors, best[1]):
                k = fit.per_image(keep, t)
                b.copy_(torch.where(k, t, b))
                if go_back:
                    t.copy_(b)
        return np.where(better, mse, best[0]), best[1]


__all__ = ["BatchFitter", "StackedNIF", "encode_batch", "encode_many"]
