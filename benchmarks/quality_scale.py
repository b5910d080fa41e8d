#!/usr/bin/env python
"""The `quality` option's scale: its calibration against JPEG, and a check of it by encoding.

    python benchmarks/quality_scale.py calibrate [--run benchmarks/results/kodak/rd_nif-e5-cpu-s0-s75.json]
    python benchmarks/quality_scale.py check --only kodim01,kodim05 --crop 256 --quality 30 60 85 --effort 5
    python benchmarks/quality_scale.py sizes --size 32 --bpp 3 6 12 24 --out sizes.jsonl   (then: sizes --fit)

`calibrate` reads a run of rd.py (NIF's files of the 24 Kodak images at several bpp), codes each image as JPEG at
every quality 1-100 with the JPEG measure of `pillow_nif.quality` (its entropy-coded bits, and its PSNR), finds the
JPEG bits at each NIF file's PSNR, and fits quality.py's power law: NIF's network bits (the file less
fit._least_overhead) = GAIN * JPEG's bits ** POWER, a pixel. It prints the fit, the same fit with each image left out
in turn (how far off a new image's bits would be), and, simulated on the run's files, how far the PSNR of a file at
quality's bpp would be from the JPEG's at that quality (the NIF curve interpolated in log bpp; within its range).

`check` encodes (pillow_nif.fit.encode_image, one thread) each image (or its centre `--crop` square, `--mode L` for
grey) at each quality and prints, per encode, the bpp quality asked for, the file's bpp and PSNR and the JPEG's
PSNR at that quality, then the mean and spread of the difference.

`sizes` encodes the centre `--size` square of each image at each `--bpp` (effort 5, one thread), one JSON line per
file appended to `--out` (a run resumes: encodes already there are skipped). `sizes --fit` reads those lines back
and, for each crop and quality, interpolates the bits the network needed to reach the JPEG's PSNR at that quality
(on the crop's PSNR curve in log bits, made monotone), divides them by the power law's, and prints each size's
geometric mean of those ratios (quality.py's SMALL_FACTORS), and the one power of SMALL_PIXELS / pixels that would
fit them all.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def kodak_dir() -> Path:
    shared = Path(os.environ.get("PILLOW_NIF_SHARED", ROOT.parent / "shared"))
    return shared / "datasets" / "kodak"


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(peak**2 / mse) if mse > 0 else math.inf


def jpeg_point(im, q: int) -> tuple[float, float]:
    """(entropy-coded bits a pixel, RGB/L PSNR) of Pillow's JPEG of `im` at quality q, as quality.py measures it."""
    from PIL import Image

    from pillow_nif import quality

    bits = quality.jpeg_bits(quality.planes(im), q)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q, optimize=True)
    dec = np.asarray(Image.open(buf).convert(im.mode))
    return bits / (im.width * im.height), psnr(np.asarray(im), dec)


def calibrate(args) -> None:
    from PIL import Image

    from pillow_nif import fit

    run = json.loads(Path(args.run).read_text())["records"]
    recs = [r for r in run.values() if r["codec"] == "nif"]
    images = sorted({r["image"] for r in recs})
    targets = sorted({r["target_bpp"] for r in recs})
    curves = {}
    for name in images:
        im = Image.open(kodak_dir() / f"{name}.png").convert("RGB")
        curves[name] = np.array([jpeg_point(im, q) for q in range(1, 101)])  # (bits a pixel, PSNR) by quality
    rows = []  # (image, target, log JPEG bits at the file's PSNR, log network bits, NIF bpp, PSNR)
    for r in recs:
        c = curves[r["image"]]
        order = np.argsort(c[:, 1])
        log_jpeg = float(np.interp(r["psnr"], c[order, 1], np.log(c[order, 0])))
        fixed = fit._least_overhead(r["width"], r["height"], "RGB", "auto", {}, fit.FitConfig())
        net = (r["bytes"] - fixed) * 8 / (r["width"] * r["height"])
        rows.append((r["image"], r["target_bpp"], log_jpeg, math.log(net), r["bpp"], r["psnr"]))
    x = np.array([r[2] for r in rows])
    y = np.array([r[3] for r in rows])
    a = np.c_[np.ones_like(x), x]
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    gain, power = math.exp(coef[0]), float(coef[1])
    out = {"run": str(args.run), "images": len(images), "targets": targets, "gain": gain, "power": power,
           "residual_sd_log": float(np.std(y - a @ coef))}
    loo, gaps = [], {q: [] for q in args.quality}
    for name in images:
        keep = np.array([r[0] != name for r in rows])
        c_ = np.linalg.lstsq(a[keep], y[keep], rcond=None)[0]
        loo += list(y[~keep] - a[~keep] @ c_)
        nif = sorted((math.log(r[4]), r[5]) for r in rows if r[0] == name)
        fixed = fit._least_overhead(768, 512, "RGB", "auto", {}, fit.FitConfig()) * 8 / (768 * 512)
        for q in args.quality:
            bits, jpeg_psnr = curves[name][q - 1]
            bpp = fixed + math.exp(c_[0]) * bits ** c_[1]
            if nif[0][0] <= math.log(bpp) <= nif[-1][0]:
                at = float(np.interp(math.log(bpp), [n[0] for n in nif], [n[1] for n in nif]))
                gaps[q].append((at - jpeg_psnr, bpp))
    out["leave_one_out_sd_log"] = float(np.std(loo))
    out["leave_one_out_max_log"] = float(np.max(np.abs(loo)))
    print(f"{len(rows)} files of {len(images)} images at {targets} bpp ({args.run})")
    sd, worst = out["leave_one_out_sd_log"], out["leave_one_out_max_log"]
    print(f"network bpp = {gain:.4f} * JPEG bits a pixel ** {power:.4f}; "
          f"residual sd of the log {out['residual_sd_log']:.4f}")
    print(f"each image left out: sd of the log {sd:.4f} (x{math.exp(sd):.3f}), at most {worst:.3f}")
    print("simulated (each image left out): the file's PSNR at quality's bpp less the JPEG's at that quality")
    out["simulated"] = {}
    for q, g in gaps.items():
        if not g:
            continue
        d = np.array([v[0] for v in g])
        b = [v[1] for v in g]
        out["simulated"][q] = {"n": len(d), "mean": float(d.mean()), "sd": float(d.std()), "min": float(d.min()),
                               "max": float(d.max()), "bpp_min": min(b), "bpp_max": max(b)}
        print(f"  quality {q}: {len(d)} images in range, bpp {min(b):.2f}-{max(b):.2f}, difference {d.mean():+.2f} dB"
              f" (sd {d.std():.2f}, {d.min():+.2f} ... {d.max():+.2f})")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


def check(args) -> None:
    import torch
    from PIL import Image

    from pillow_nif import fit

    torch.set_num_threads(args.threads)
    names = args.only.split(",")
    diffs = {q: [] for q in args.quality}
    records = []
    for name in names:
        im = Image.open(kodak_dir() / f"{name}.png").convert(args.mode)
        if args.crop:
            im = centre_crop(im, args.crop)
        for q in args.quality:
            _, jpeg_psnr = jpeg_point(im, q)
            asked = fit.quality_bpp(im, q, {}, "auto", fit.FitConfig())
            t0 = time.perf_counter()
            r = fit.encode_image(im, quality=q, effort=args.effort, seed=args.seed)
            rec = {"image": name, "size": im.size, "mode": im.mode, "quality": q, "effort": args.effort,
                   "asked_bpp": asked, "bpp": r.bpp, "psnr": r.psnr, "jpeg_psnr": jpeg_psnr,
                   "seconds": time.perf_counter() - t0}
            records.append(rec)
            diffs[q].append(r.psnr - jpeg_psnr)
            print(json.dumps(rec), flush=True)
    for q, d in diffs.items():
        d = np.array(d)
        print(f"quality {q}: NIF - JPEG {d.mean():+.2f} dB (sd {d.std():.2f}, {d.min():+.2f} ... {d.max():+.2f}), "
              f"{len(d)} images")
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


def centre_crop(im, s: int):
    w, h = im.size
    return im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


def sizes(args) -> None:
    import torch
    from PIL import Image

    from pillow_nif import fit

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = {(r["image"], r["size"], r["target_bpp"]) for r in _lines(out)}
    for name in args.only.split(","):
        for s in args.size:
            im = centre_crop(Image.open(kodak_dir() / f"{name}.png").convert("RGB"), s)
            for bpp in args.bpp:
                if (name, s, bpp) in done:
                    continue
                t0 = time.perf_counter()
                try:
                    r = fit.encode_image(im, bpp, effort=args.effort, seed=args.seed)
                except ValueError as e:  # a bpp under the least file's
                    print(f"{name} {s} {bpp}: {e}", file=sys.stderr)
                    continue
                fixed = fit._least_overhead(s, s, "RGB", "auto", {}, fit.FitConfig())
                rec = {"image": name, "size": s, "target_bpp": bpp, "effort": args.effort, "bytes": len(r.data),
                       "payload_bpp": (len(r.data) - fixed) * 8 / (s * s), "psnr": r.psnr,
                       "params": r.arch.num_params(), "seconds": time.perf_counter() - t0}
                with out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def fit_sizes(args) -> None:
    """The size factors of quality.py, from `sizes` runs (see the module's doc)."""
    from PIL import Image

    from pillow_nif import quality

    recs = _lines(Path(args.out))
    rows = []  # (size, image, quality, log of needed bits over the law's)
    for name, s in sorted({(r["image"], r["size"]) for r in recs}):
        pts = sorted((r["payload_bpp"], r["psnr"]) for r in recs if (r["image"], r["size"]) == (name, s))
        lb = np.log([p[0] for p in pts])
        ps = np.maximum.accumulate([p[1] for p in pts])  # more bits never need to do worse: the encoder's best
        im = centre_crop(Image.open(kodak_dir() / f"{name}.png").convert("RGB"), s)
        for q in args.quality:
            bits, jpeg_psnr = jpeg_point(im, q)
            law = quality.GAIN * bits**quality.POWER
            if not ps[0] <= jpeg_psnr <= ps[-1]:
                print(f"{name} {s} q{q}: JPEG {jpeg_psnr:.2f} dB outside NIF's {ps[0]:.2f} ... {ps[-1]:.2f}")
                continue
            k = int(np.searchsorted(ps, jpeg_psnr))  # first point at or above: the step up's bits, interpolated
            need = lb[0] if k == 0 else float(np.interp(jpeg_psnr, ps[k - 1 : k + 1], lb[k - 1 : k + 1]))
            rows.append((s, name, q, need - math.log(law)))
    ref = args.ref_pixels
    x = np.array([max(0.0, math.log(ref / (s * s))) for s, *_ in rows])
    y = np.array([r[3] for r in rows])
    power = float(x @ y / (x @ x))  # through the origin: no change at ref_pixels and above
    print(f"{len(rows)} (crop, quality) points; one power through 1 at {ref} pixels: {power:.4f}")
    for s in sorted({r[0] for r in rows}):
        sel = np.array([r[0] == s for r in rows])
        pred = power * max(0.0, math.log(ref / (s * s)))
        print(f"  {s}x{s}: needed / law x{math.exp(y[sel].mean()):.2f} (log sd {y[sel].std():.2f}, "
              f"{sel.sum()} points; quality.small_factor x{quality.small_factor(s * s):.2f}), the power's "
              f"x{math.exp(pred):.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="part", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--run", default=str(ROOT / "benchmarks/results/kodak/rd_nif-e5-cpu-s0-s75.json"))
    c.add_argument("--quality", type=int, nargs="+", default=[20, 30, 40, 50, 60, 70, 80, 90])
    c.add_argument("--out")
    k = sub.add_parser("check")
    k.add_argument("--only", default="kodim01,kodim03,kodim05,kodim13,kodim20,kodim23")
    k.add_argument("--crop", type=int, default=0, help="the centre square of this side (0: the whole image)")
    k.add_argument("--mode", default="RGB", choices=["RGB", "L"])
    k.add_argument("--quality", type=int, nargs="+", default=[30, 60, 85])
    k.add_argument("--effort", type=int, default=5)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--threads", type=int, default=1)
    k.add_argument("--out")
    z = sub.add_parser("sizes")
    z.add_argument("--only", default="kodim01,kodim03,kodim05,kodim13,kodim20,kodim23")
    z.add_argument("--size", type=int, nargs="+", default=[16, 32, 64, 128])
    z.add_argument("--bpp", type=float, nargs="+", default=[3, 6, 12, 24])
    z.add_argument("--effort", type=int, default=5)
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--threads", type=int, default=1)
    z.add_argument("--out", required=True, help="JSON lines, appended to (a run resumes)")
    z.add_argument("--fit", action="store_true", help="fit the size factor to --out's records instead of encoding")
    z.add_argument("--quality", type=int, nargs="+", default=[30, 50, 75, 90])
    z.add_argument("--ref-pixels", type=int, default=256 * 256)
    args = p.parse_args()
    if args.part == "sizes":
        (fit_sizes if args.fit else sizes)(args)
    else:
        (calibrate if args.part == "calibrate" else check)(args)


if __name__ == "__main__":
    main()
