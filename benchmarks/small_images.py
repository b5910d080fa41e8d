#!/usr/bin/env python
"""Small images at low efforts: the encoder as it is now against it without one of its levers (`--lever`).

    python benchmarks/small_images.py --only kodim20,kodim15,kodim05 --size 128 --bpp 1.0 --effort 2 --seeds 0,1
    python benchmarks/small_images.py --only kodim20 --size 96 --bpp 2.0 --effort 2 --seeds 0,1,2,3,4,5,6,7
    python benchmarks/small_images.py --lever period --only kodim20,kodim02 --size 160 --bpp 2.0 --effort 2 --seeds 0,1

Each Kodak image's centre `--size` x `--size` square (from ../shared/datasets/kodak, or `--kodak DIR`) is encoded
twice per seed in a child process on one thread: as the encoder is now (`now`) and without the lever (`before`):
- `dense` (NOTES.md #187): where a step samples a quarter of the image or more, efforts 1-4 keep plain networks up to
  fit.SHORT_DEEP_PARAMS; before, fit.DENSE_SHORT_STAGE set to fit.SHORT_STAGE, so modulated from fit.DEEP_PARAMS;
- `period` (#188): short stages train the period's offset at FitConfig.period_lr x the rate; before, at the rate.
Prints one JSON line per encode (the file's PSNR at its bit depth, post-filter included; the fit's; bytes; seconds),
then per image the mean difference now - before over the seeds. The fits are chaotic: compare within one run, on one
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One encode (argv: path, size, bpp, effort, seed, rule, lever).
CHILD = r"""
import json, sys
import torch
from PIL import Image
from pillow_nif import fit

path, size, bpp, effort, seed, rule, lever = sys.argv[1:8]
size = int(size)
torch.set_num_threads(1)
cfg = fit.FitConfig()
if rule == "before" and lever == "dense":
    fit.DENSE_SHORT_STAGE = fit.SHORT_STAGE
if rule == "before" and lever == "period":
    cfg = fit.FitConfig(period_lr=1.0)
im = Image.open(path).convert("RGB")
left, top = (im.width - size) // 2, (im.height - size) // 2
im = im.crop((left, top, left + size, top + size))
r = fit.encode_image(im, bpp=float(bpp), effort=int(effort), device="cpu", seed=int(seed), config=cfg)
print(json.dumps(dict(bytes=len(r.data), psnr=round(r.psnr, 3), fit_psnr=round(r.fit_psnr, 3),
                      seconds=round(r.seconds, 1), widths=r.arch.widths, modulated=bool(r.arch.mod_widths))))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", required=True, help="comma-separated Kodak image names (e.g. kodim20,kodim15)")
    p.add_argument("--kodak", type=Path, default=ROOT.parent / "shared" / "datasets" / "kodak")
    p.add_argument("--size", type=int, default=128, help="side of the centre square (default 128)")
    p.add_argument("--bpp", type=float, default=1.0)
    p.add_argument("--effort", type=int, default=2)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--lever", choices=("dense", "period"), default="dense", help="what `before` goes without")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not 8 <= args.size <= 512:
        p.error("--size: 8 ... 512 (the Kodak images are 768x512)")
    names = args.only.split(",")
    for n in names:
        if not (args.kodak / f"{n}.png").exists():
            p.error(f"no {n}.png in {args.kodak}")
    runs = [(n, int(s), rule) for n in names for s in args.seeds.split(",") for rule in ("now", "before")]

    def encode(run):
        name, seed, rule = run
        cmd = [sys.executable, "-c", CHILD, str(args.kodak / f"{name}.png"), str(args.size), str(args.bpp),
               str(args.effort), str(seed), rule, args.lever]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            raise SystemExit(f"{name} seed {seed} {rule}: {done.stderr[-2000:]}")
        rec = dict(image=name, size=args.size, bpp=args.bpp, effort=args.effort, seed=seed, rule=rule,
                   lever=args.lever,
                   **json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rec), flush=True)
        return rec

    with ThreadPoolExecutor(args.jobs) as pool:
        records = list(pool.map(encode, runs))
    summary = {}
    for n in names:
        psnrs = {rule: [r["psnr"] for r in records if r["image"] == n and r["rule"] == rule]
                 for rule in ("now", "before")}
        summary[n] = round(sum(psnrs["now"]) / len(psnrs["now"]) - sum(psnrs["before"]) / len(psnrs["before"]), 3)
    print(json.dumps(dict(now_minus_before_db=summary, mean_db=round(sum(summary.values()) / len(summary), 3))))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(options={k: str(v) for k, v in vars(args).items()}, records=records,
                                            summary=summary), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
