#!/usr/bin/env python
"""What the quantisation-aware tuning does with one fit (on the CPU), without fitting again for each variant.

    python benchmarks/cached_fit.py --only kodim05,kodim21 --bpp 0.3 --variants ref,none,1.0:0.7,3.0:0.7
    python benchmarks/cached_fit.py --dataset kodak-crop256 --only kodim05 --bpp 1.0 --effort 3 --out tune.jsonl

An encode's fit takes 90-95 % of its time (5 to 18 minutes at 768x512, effort 5, 0.3 to 1.0 bpp, one CPU thread),
and a fit is chaotic: a rerun with any change moves its file by ±0.05 dB, as much as most levers after it. So each
image is fitted once, as `encode_image` fits it (`fit.fit_network`), and every variant is coded from its own copy of
that fit (`fit.code_network`): the variants' differences are theirs alone. Variants:

- `ref`: the committed schedule; its file is the encoder's to the byte (but the encoder fits a smaller network again
  where rounding cost more than `FitConfig.refit_loss`: such records say `"refit": true`; tiled images are refused),
- `none`: the rounded network without the tuning,
- `M:L`: the tuning `M` times as long and at `L` times the rate at full sparseness, as `FitConfig.sparse_qat_iters`
  and `sparse_qat_lr` set them (linear in `fit.sparseness`: a 256x256 crop keeps its schedule),
- `M:L:P`: that, with each tuning step on `P` times the pixels (the importance sampler's grid denser),
- `field=value[;field=value]`: the `fit.FitConfig` fields that the coding reads (CODING_FIELDS, e.g. `qat_lr=5e-06`).

Prints one JSON line per variant (bytes, the file's hash, PSNR of the decoded file, the rounding's cost in network
space, the tuning's steps in all) and each variant's mean difference from `ref`; `--out` appends the lines to a file.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


# The FitConfig fields a `field=value` variant may set: those the coding reads from the fitter's cfg (the rest are
# baked into the fit, the Fitter or the plan, and would silently change nothing).
CODING_FIELDS = {"qat_lr", "sparse_qat_iters", "sparse_qat_lr", "lr_floor", "grad_clip", "rd_steps"}


def check_variant(variant: str) -> None:
    """SystemExit for a variant this harness cannot run as written."""
    if variant in ("ref", "none"):
        return
    if "=" in variant:
        fields = [kv.split("=", 1)[0] for kv in variant.split(";")]
        if set(fields) - CODING_FIELDS:
            raise SystemExit(f"{variant}: only {', '.join(sorted(CODING_FIELDS))} act on the coding")
        return
    parts = variant.split(":")
    try:
        [float(x) for x in parts]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3):
        raise SystemExit(f"{variant}: a variant is ref, none, M:L, M:L:P or field=value[;field=value]")


def tuning_schedule(fitter, cfg) -> tuple[int, float]:
    """(tuning steps a stage, tuning rate) that `cfg` gives `fitter`'s image and network (as Fitter.__init__ sets
    them)."""
    from pillow_nif import fit

    sparse = fit.sparseness(fitter.h, fitter.w, fitter.model.arch, fitter.effort, cfg)
    _, iters, lr = fit.sparse_schedule(sparse, fitter.effort, cfg, fitter.model.arch, fitter.h * fitter.w)
    return iters, lr


def denser_tuning(fitter, times: float) -> None:
    """The fit's tuning steps on about `times` as many pixels: the sampler's rows and each row's columns that much
    denser, its error map kept (the fitting steps' is where the tuning starts)."""
    s = fitter.sampler
    k = math.sqrt(times)
    s.rows, s.cols = min(fitter.h, round(s.rows * k)), min(fitter.w, round(s.cols * k))
    s.steps = s.steps.new_tensor(range(max(s.rows, s.cols)))
    s.ahead = []  # drawn at the old size


def run_image(name: str, image, bpp: float, level: int, variants: list[str], seed: int,
              out: Path | None = None) -> list[dict]:
    """One fit of `image` at `bpp` and effort `level`, and each variant's record (appended to `out` as it comes)."""
    import torch

    from pillow_nif import fit
    from pillow_nif.imaging import fill_hidden, prepare_image, split_constant_alpha

    cfg = fit.FitConfig()
    eff = fit.effort_for(level, *image.size, cfg)
    image, alpha = split_constant_alpha(fill_hidden(image))
    metadata = fit.metadata_of(image, alpha=alpha)
    if fit.tile_grid(*image.size, cfg.tile_pixels) != (1, 1) or fit.constant_result(image, metadata, bpp, cfg, False):
        raise SystemExit(f"{name}: the encoder would tile it or store one colour, not fit one network")
    plan = fit.plan_encode(image, bpp, "auto", metadata, cfg, eff)
    pixels, _, maxval = prepare_image(image)
    t0 = time.perf_counter()
    fitter, gain, fit_mse = fit.fit_network(pixels, plan, "cpu", eff, cfg, seed, fit._NoBar())
    fit_s = time.perf_counter() - t0
    records = []
    for variant in variants:
        # The same torch module, not a copy of it; everything else (weights, generator, sampler) copied.
        f = copy.deepcopy(fitter, {id(torch): torch})
        if "=" in variant:  # FitConfig fields for the coding, e.g. qat_lr=5e-06
            fields = dict(kv.split("=", 1) for kv in variant.split(";"))
            f.cfg = dataclasses.replace(cfg, **{k: ast.literal_eval(v) for k, v in fields.items()})
        elif variant not in ("ref", "none"):
            mult, rate, *times = (float(x) for x in variant.split(":"))
            f.cfg = dataclasses.replace(cfg, sparse_qat_iters=mult, sparse_qat_lr=rate)
            if times and f.sampler is None:
                print(f"{name}: {variant} skipped: this image's steps already see every pixel", flush=True)
                continue
            if times:
                denser_tuning(f, times[0])
        f.qat_iters, f.qat_lr = tuning_schedule(f, f.cfg)
        t1 = time.perf_counter()
        coding = dataclasses.replace(eff, qat_stages=0) if variant == "none" else eff
        data, loss = fit.code_network(f, gain, fit_mse, pixels, maxval, plan, "cpu", coding, f.cfg, fit._NoBar())
        mse = fit._file_mse(data, pixels, maxval, "cpu")
        records.append(dict(image=name, bpp=bpp, effort=level, variant=variant, seed=seed,
                            tuning_steps=0 if variant == "none" else f.qat_iters * eff.qat_stages,
                            tuning_lr=None if variant == "none" else f.qat_lr, refit=loss > cfg.refit_loss,
                            bytes=len(data), sha1=hashlib.sha1(data).hexdigest()[:16],
                            psnr=10 * math.log10(maxval**2 / mse), rounding_db=loss,
                            fit_s=round(fit_s, 1), code_s=round(time.perf_counter() - t1, 1)))
        print(json.dumps(records[-1]), flush=True)
        if out:
            with out.open("a") as fh:
                fh.write(json.dumps(records[-1]) + "\n")
    return records


def main(argv=None) -> int:
    from rd import _import_nif, load_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="kodak")
    p.add_argument("--only", help="comma-separated image names")
    p.add_argument("--bpp", type=float, nargs="+", default=[0.3])
    p.add_argument("--effort", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="ref,none,1.0:0.7,1.5:0.7,3.0:0.7,2.0:0.5,2.0:1.0")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    variants = list(dict.fromkeys(["ref"] + args.variants.split(",")))  # ref first, each once
    for v in variants:
        check_variant(v)
    _import_nif()
    images = load_dataset(args.dataset, None, args.only.split(",") if args.only else None)
    records = []
    for name, image in images.items():
        for bpp in args.bpp:
            records += run_image(name, image, bpp, args.effort, variants, args.seed, args.out)
    ref = {(r["image"], r["bpp"]): r["psnr"] for r in records if r["variant"] == "ref"}
    for v in variants[1:]:
        d = [r["psnr"] - ref[r["image"], r["bpp"]] for r in records if r["variant"] == v]
        if not d:  # skipped on every image
            continue
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        print(f"{v}: {statistics.mean(d):+.4f} dB against ref (sd {sd:.4f}, {sum(x > 0 for x in d)} of {len(d)} up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
