#!/usr/bin/env python
"""Images of a narrow range of values, with the fit's output gain (fit.OutputGain) and without it.

    python benchmarks/narrow_range.py --only kodim03,kodim05 --kinds 12bit 10bit@30000 rgb/4 --bpp 1.0 --jobs 2

Each image's centre `--crop` square becomes each kind of narrow data: `Nbit` its luma as N-bit values in I;16
(`Nbit@OFFSET`: plus OFFSET), `rgb/D` its RGB values divided by D (a dark 8-bit photo), `16bit` the full-range
reference. Each is encoded (pillow_nif.fit.encode_image, one thread a job) with FitConfig.output_gain_octaves at each
of `--octaves` (0: no gain, the encoder before session 78). Reported per encode: the file's bpp, its PSNR at the
data's own range (peak 2^N - 1 for N-bit data, 255 / D for rgb/D) and at the container's (65535 or 255), and the
seconds; then the mean difference of each octave setting from the first, per kind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def kodak_dir() -> Path:
    return Path(os.environ.get("PILLOW_NIF_SHARED", ROOT.parent / "shared")) / "datasets" / "kodak"


def narrow(name: str, kind: str, crop: int):
    """(values as an array, the image, the data's own peak, the container's peak) of one kind of narrow data."""
    from PIL import Image

    im = Image.open(kodak_dir() / f"{name}.png").convert("RGB")
    w, h = im.size
    s = min(crop or max(w, h), w, h) if crop else None
    if s:
        im = im.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))
    rgb = np.asarray(im, dtype=np.float64)
    if kind.startswith("rgb/"):
        d = float(kind[4:])
        v = np.round(rgb / d).astype(np.uint8)
        return v, Image.fromarray(v), 255 / d, 255
    bits, _, offset = kind.partition("bit")
    bits, offset = int(bits), int(offset.lstrip("@") or 0)
    luma = rgb @ [0.299, 0.587, 0.114] / 255
    v = (np.round(luma * (2**bits - 1)) + offset).astype(np.uint16)
    return v, Image.fromarray(v), 2**bits - 1, 65535


def one(job):
    name, kind, crop, bpp, effort, octaves = job
    import torch

    from pillow_nif import fit
    from pillow_nif.render import decode_array

    torch.set_num_threads(1)
    values, im, peak, container = narrow(name, kind, crop)
    cfg = dataclasses.replace(fit.FitConfig(), output_gain_octaves=octaves)
    t0 = time.perf_counter()
    r = fit.encode_image(im, bpp=bpp, effort=effort, config=cfg, measure=False)
    seconds = time.perf_counter() - t0
    out = decode_array(r.data).reshape(values.shape).astype(np.float64)
    mse = float(np.mean((out - values) ** 2))
    own = 10 * math.log10(peak**2 / mse) if mse else math.inf
    return dict(image=name, kind=kind, octaves=octaves, bpp=r.bpp, psnr_own=own,
                psnr_container=own + 20 * math.log10(container / peak), seconds=seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="kodim03,kodim05,kodim19,kodim23")
    p.add_argument("--kinds", nargs="+", default=["12bit", "10bit@30000", "rgb/4", "rgb/2"])
    p.add_argument("--crop", type=int, default=256, help="the centre square's side (0: the whole image)")
    p.add_argument("--bpp", type=float, default=1.0)
    p.add_argument("--effort", type=int, default=5)
    p.add_argument("--octaves", type=int, nargs="+", default=[0, 12])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, help="a JSON file for the records")
    args = p.parse_args()
    jobs = [(n, k, args.crop, args.bpp, args.effort, o) for n in args.only.split(",") for k in args.kinds
            for o in args.octaves]
    records = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for rec in pool.map(one, jobs):
            records.append(rec)
            print(f"{rec['image']} {rec['kind']:>12} octaves {rec['octaves']:>2}: {rec['bpp']:.3f} bpp, "
                  f"{rec['psnr_own']:.2f} dB own range ({rec['psnr_container']:.2f} container), "
                  f"{rec['seconds']:.0f} s", flush=True)
    base = args.octaves[0]
    for kind in args.kinds:
        for o in args.octaves[1:]:
            d = [r["psnr_own"] - b["psnr_own"] for r in records for b in records
                 if r["kind"] == b["kind"] == kind and r["image"] == b["image"] and r["octaves"] == o
                 and b["octaves"] == base]
            print(f"{kind}: octaves {o} - {base}: {np.mean(d):+.2f} dB on the mean ({min(d):+.2f} ... "
                  f"{max(d):+.2f}, {sum(x > 0 for x in d)} of {len(d)} up)")
    if args.out:
        args.out.write_text(json.dumps(dict(args={k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()}, records=records), indent=1))


if __name__ == "__main__":
    main()
