#!/usr/bin/env python
"""What TF32 matmuls in the fitting steps cost in PSNR at equal bpp, emulated on the CPU.

    python benchmarks/tf32_fit.py --dataset kodak-crop256 --only kodim01,kodim05 --bpp 1.0 --modes fp32,trunc
    python benchmarks/tf32_fit.py --dataset kodak --only kodim05 --bpp 0.3 --modes trunc --ops ns --jobs 2

A GPU's tensor cores multiply TF32: fp32 operands with their 13 lowest mantissa bits dropped (10 bits kept), the
products summed in fp32. They are ~8x the fp32 rate on an H100, and issue 5 allows mixed precision only where the
harness shows no loss in PSNR at equal bpp. The CPU has no TF32, so this rounds the operands of every matrix
product inside `fit.Fitter.run_stage` (the fitting and tuning steps: the network's products and Muon's Newton-Schulz
iterations) before the product, with a torch dispatch mode, and leaves everything else (rate control, the choice of
the best stage, the post-filter, decoding) in fp32, as a GPU encode with TF32 steps would have it:

- `trunc`: the 13 bits cut off (the larger error; which of the two a GPU's path does, its libraries decide),
- `rne`: rounded to the nearest TF32 value, ties to even,
- `fp32`: no rounding (the reference, encoded in the same run: the fits are chaotic, so a rerun of the reference
  on another machine or thread count would move by as much as the effect),
- `fused`: no rounding, the network's forward and backward by the fused Triton training kernels
  (`FitConfig.fused_network`, kernels/nif_train.py) in Triton's interpreter: their fp32 arithmetic end to end,
  for issue 5's "same PSNR as the reference path" (slow: ~15 minutes for a 96x96 image at effort 2).

`--ops` picks the products rounded: `all`, `ns` (Muon's iterations only: torch.optim.Muon runs them in bfloat16)
or `net` (the network's only). Each encode runs in its own process on one thread (`--threads`; `--jobs` at once).
Prints one JSON line per encode and, at the end, each mode's mean difference from `fp32` per image; `--out` writes
them all.
`--seed` encodes with another seed: fp32 with seed 1 against seed 0's files is the null, what any change of the
fit's random numbers moves; `--threads 2` with fp32 is the null of rounding alone (the same draws, sums split
otherwise). The rounding makes an encode ~1.4x slower on the CPU: this measures PSNR, not time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def tf32(t, rounding: str = "trunc"):
    """A float32 tensor's values at TF32's precision (10 mantissa bits): `trunc` cuts the 13 lower bits, `rne` rounds
    to the nearest, ties to even. Anything else is returned as it is."""
    import torch

    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        return t
    i = t.contiguous().view(torch.int32)
    if rounding == "rne":
        i = i + (0xFFF + ((i >> 13) & 1))
    return (i & ~0x1FFF).view(torch.float32)


def tf32_products(rounding: str = "trunc", ops: str = "all"):
    """A torch dispatch mode in which matrix products take their operands at TF32's precision (`ops`: `all`, `ns`
    for Muon's Newton-Schulz iterations only, `net` for the others), their sums left in fp32, as tensor cores do."""
    import traceback

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    # each product's operands, after addmm's and baddbmm's accumulator
    products = {aten.mm.default: (0, 1), aten.bmm.default: (0, 1), aten.addmm.default: (1, 2),
                aten.baddbmm.default: (1, 2), aten.addmm_.default: (1, 2), aten.baddbmm_.default: (1, 2)}

    class TF32Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            rounded = func in products
            if rounded and ops != "all":
                muon = any(f.name == "_newton_schulz" for f in traceback.extract_stack(limit=4))
                rounded = muon == (ops == "ns")
            if rounded:
                args = list(args)
                for j in products[func]:
                    args[j] = tf32(args[j], rounding)
            return func(*args, **(kwargs or {}))

    return TF32Products()


# One encode, in a child process (argv: dataset, image, bpp, mode, ops, effort, seed, threads).
CHILD = r"""
import json, sys, time
import numpy as np
import torch
sys.path.insert(0, HERE)
import rd
import tf32_fit
import pillow_nif
from pillow_nif import fit

dataset, name, bpp, mode, ops, effort, seed, threads = sys.argv[1:9]
torch.set_num_threads(int(threads))
if mode in ("trunc", "rne"):
    run_stage = fit.Fitter.run_stage

    def rounded_stage(self, *a, **k):
        with tf32_fit.tf32_products(mode, ops):
            return run_stage(self, *a, **k)

    fit.Fitter.run_stage = rounded_stage

im = rd.load_dataset(dataset, None, [name])[name]
t = time.perf_counter()
config = fit.FitConfig(fused_network=mode == "fused")  # fused: the Triton kernels, interpreted (TRITON_INTERPRET)
res = fit.encode_image(im, bpp=float(bpp), effort=int(effort), device="cpu", seed=int(seed), config=config)
seconds = time.perf_counter() - t
out = np.asarray(pillow_nif.decode(res.data).convert("RGB"))
print(json.dumps(dict(image=name, bpp=float(bpp), mode=mode, ops=ops, seed=int(seed), threads=int(threads),
                      bytes=len(res.data),
                      real_bpp=len(res.data) * 8 / (im.width * im.height),
                      psnr=rd.psnr(rd.mse(out, np.asarray(im))), seconds=round(seconds, 1))))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="kodak-crop256", help="as rd.py: kodak, kodak-crop256 or a folder of PNGs")
    p.add_argument("--only", required=True, help="comma-separated image names (e.g. kodim01,kodim05)")
    p.add_argument("--bpp", type=float, nargs="+", default=[1.0])
    p.add_argument("--modes", default="fp32,trunc", help="fp32, trunc, rne, fused (comma-separated)")
    p.add_argument("--ops", default="all", choices=("all", "ns", "net"))
    p.add_argument("--effort", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="the encodes' seed (another seed against seed 0's fp32 files: "
                   "what any change of the fit's random numbers moves)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each encode (default 1)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if not set(modes) <= {"fp32", "trunc", "rne", "fused"}:
        p.error("--modes: fp32, trunc, rne, fused")
    runs = [(name, bpp, mode) for name in args.only.split(",") for bpp in args.bpp for mode in modes]

    def encode(run):
        name, bpp, mode = run
        code = CHILD.replace("HERE", repr(str(HERE)))
        cmd = [sys.executable, "-c", code, args.dataset, name, str(bpp), mode, args.ops, str(args.effort),
               str(args.seed), str(args.threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        if mode == "fused":
            env["TRITON_INTERPRET"] = "1"  # the kernels on the CPU
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"{name} {bpp} {mode}: {done.stderr[-2000:]}")
        rec = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(rec), flush=True)
        return rec

    t = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        records = list(pool.map(encode, runs))
    ref = {(r["image"], r["bpp"]): r for r in records if r["mode"] == "fp32"}
    summary = {}
    for mode in modes:
        if mode == "fp32":
            continue
        d = [r["psnr"] - ref[r["image"], r["bpp"]]["psnr"] for r in records
             if r["mode"] == mode and (r["image"], r["bpp"]) in ref]
        if d:
            summary[mode] = dict(images=len(d), mean_db=sum(d) / len(d), min_db=min(d), max_db=max(d))
    print(json.dumps(dict(ops=args.ops, summary=summary, seconds=round(time.perf_counter() - t))))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(options=vars(args) | {"out": str(args.out)}, records=records,
                                            summary=summary), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
