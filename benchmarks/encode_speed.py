#!/usr/bin/env python
"""Encode speed: whole-call encode time, training-step time, batch throughput; JSON on stdout.

    python benchmarks/encode_speed.py [--out speed.json] [--effort 5] [--device auto]
    python benchmarks/encode_speed.py --effort 1 --batch-n 4 --batch-size 128 --cpu-size 128   # quick, CPU

Sections (each can be skipped with --skip NAME,NAME):
  kodak:    one whole call per target (--bpp, default 0.3 and 1.0): pillow_nif.encode of a Kodak image (768x512)
            at --effort on --device, the file written to disk; bytes, bpp and PSNR of the decoded file, and the
            seconds of each stage of the encode (PHASES: fitting, quantisation, tuning, post-filter, result).
            --kodak-fused repeats each with the fused Triton training pass (FitConfig.fused_network; CUDA).
  step:     time of one training step (sample, forward, loss, backward, optimiser) on that image's network for the
            largest --bpp: fit.Fitter's (subgrid.SubgridNetwork, channel-major) launched from Python, the batch
            encoder's StackedNIF (B=1) in torch, StackedNIF with the fused Triton sine layer, and (the encoder's
            default on CUDA) fit.Fitter's replayed from CUDA graphs (stepgraph.py; per step net of the capture); then
            fit.Fitter's with the fused training pass (kernels/nif_train.py) in place of subgrid.py, launched from
            Python and replayed; then replayed with TF32 products (FitConfig.tf32): Muon's alone, and every product
            of both paths. All but the first two need CUDA. Best of 3 interleaved runs of --steps steps each, after warm-up.
  tiles:    the fused training pass replayed at four tile shapes (kernels/nif_train.py's GPU_BLOCKS, GPU_WARPS), on
            the step section's network (CUDA).
  batch:    --batch-n centre crops of --batch-size px from different Kodak images at --batch-bpp:
            pillow_nif.encode_many against one pillow_nif.encode per image (the first --single-n of them, default
            all: on a GPU 64 single encodes outlast a device call); images/s of each, their ratio, and the mean
            PSNR of each over the images both encoded (the batch path follows the same recipe, so they should agree);
            --batch-fused trains the batch with the fused Triton sine layer.
  forward:  the batch encoder's design choice: a training step of --batch-n networks as hand-written batched
            matmuls (StackedNIF), as torch.func.vmap over NIF.forward_grid (stack_module_state +
            functional_call), and as one plain step per network; on the batch images' network.
  cpu:      encode time of one --cpu-size px crop at --batch-bpp, --cpu-effort (default --effort), on the CPU
            (whole call, file written).
The JSON is rewritten after every section, so a run cut short (a lent GPU's time limit) keeps what it finished.
Times are wall-clock (time.perf_counter; torch.cuda.synchronize around GPU steps). Run with OMP_NUM_THREADS set
to the cores you really have: torch's OpenMP threads spin under oversubscription.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import pillow_nif
from pillow_nif import fit
from pillow_nif.batch import BatchFitter
from pillow_nif.cli import write_atomic
from pillow_nif.render import decode_array, resolve_device
from rd import machine_info  # benchmarks/rd.py, beside this script

ROOT = pathlib.Path(__file__).resolve().parents[1]
# ../shared, or where PILLOW_NIF_SHARED points (a GPU machine gets it as a carried folder: benchmarks/gpu_session.sh).
KODAK = pathlib.Path(os.environ.get("PILLOW_NIF_SHARED") or ROOT.parent / "shared") / "datasets" / "kodak"
SECTIONS = ("kodak", "step", "tiles", "batch", "forward", "cpu")


def kodak_image(name: str) -> Image.Image:
    with Image.open(KODAK / name) as im:
        return im.convert("RGB")


def crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    s = min(size, w, h)
    return im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


def psnr(data: bytes, im: Image.Image) -> float:
    ref = np.asarray(im).astype(np.float64)
    mse = float(np.mean((decode_array(data, device="cpu").astype(np.float64).reshape(ref.shape) - ref) ** 2))
    return 10 * math.log10(255**2 / mse) if mse else math.inf


def timed_encode(im: Image.Image, path: str, config: fit.FitConfig | None = None, **opts) -> tuple[float, bytes]:
    """One whole call, as a user makes it: encode, then the file on disk (`config`: fit.encode_image's, in place of
    pillow_nif.encode's default)."""
    t = time.perf_counter()
    if config is None:
        data = pillow_nif.encode(im, **opts)
    else:
        data = fit.encode_image(im, **opts, config=config, measure=False).data
    write_atomic(path, data)
    return time.perf_counter() - t, data


# The stages of fit.encode_image, timed inside the kodak section's whole calls: where a GPU encode's seconds go.
PHASES = (("fit", fit.Fitter, "fit"), ("quantise", fit, "quantise"), ("tune", fit, "tune_and_code"),
          ("post_filter", fit, "add_post_filter"), ("result", fit, "score"))  # result: ~0, encode measures no PSNR


def timed_phases(device: str):
    """A context in which PHASES' functions add their wall time (the device synchronised around each) to a dict."""
    import contextlib
    import functools

    @contextlib.contextmanager
    def ctx():
        spent, saved = {}, []
        for name, owner, attr in PHASES:
            f = getattr(owner, attr)
            saved.append((owner, attr, f))

            @functools.wraps(f)
            def timed(*a, _f=f, _name=name, **k):
                sync(device)
                t = time.perf_counter()
                try:
                    return _f(*a, **k)
                finally:
                    sync(device)
                    spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - t

            setattr(owner, attr, timed)
        try:
            yield spent
        finally:
            for owner, attr, f in saved:
                setattr(owner, attr, f)

    return ctx()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stage_seconds(fitter: fit.Fitter, steps: int, device: str) -> float:
    """Wall time of one Fitter.run_stage (the encoder's own loop) of `steps` steps, the device synchronised."""
    sync(device)
    t = time.perf_counter()
    fitter.run_stage(steps, fitter.lr, lambda n: None)
    sync(device)
    return time.perf_counter() - t


def step_time(fitter: fit.Fitter, steps: int, device: str, repeats: int = 3) -> float:
    """Seconds per step of Fitter.run_stage: the best of `repeats` runs of `steps`."""
    fitter.run_stage(3, fitter.lr, lambda n: None)  # warm-up (and Triton compilation)
    return min(stage_seconds(fitter, steps, device) / steps for _ in range(repeats))


def graphed_step_time(fitter: fit.Fitter, steps: int, device: str) -> float:
    """Seconds per step of a stage replayed from CUDA graphs (stepgraph.py), net of the stage's set-up (its warm
    steps and the capture): the difference between a stage of 10 x `steps` steps and one of `steps`, over their
    difference in steps."""
    stage_seconds(fitter, steps, device)  # warm-up
    return (stage_seconds(fitter, 10 * steps, device) - stage_seconds(fitter, steps, device)) / (9 * steps)


def target_and_arch(im: Image.Image, bpp: float, cfg: fit.FitConfig, level: int):
    """Network-space target, and the architecture and the effort (fit.effort_for) encode_image would pick (no
    metadata)."""
    from pillow_nif.batch import _arrays, _plan

    job = _plan(0, im, bpp, "auto", {}, cfg, level)
    return _arrays(job)[1], job.header.arch, job.eff


def section_kodak(args, out: dict, tmp: str) -> None:
    im = kodak_image(args.kodak)
    res = []
    configs = [None] + [dataclasses.replace(fit.FitConfig(), fused_network=True)] * args.kodak_fused
    for config in configs:
        for bpp in args.bpp:
            with timed_phases(resolve_device(args.device)) as phases:
                s, data = timed_encode(im, os.path.join(tmp, "k.nif"), config, bpp=bpp, effort=args.effort,
                                       device=args.device)
            res.append({"target_bpp": bpp, "fused_network": config is not None, "seconds": s, "bytes": len(data),
                        "bpp": len(data) * 8 / (im.width * im.height), "psnr": psnr(data, im), "phases_s": phases})
            print(json.dumps(res[-1]), file=sys.stderr)
    out["kodak"] = {"image": args.kodak, "size": list(im.size), "effort": args.effort, "results": res}


def section_step(args, out: dict) -> None:
    cfg = fit.FitConfig()
    device = resolve_device(args.device)
    target, arch, eff = target_and_arch(kodak_image(args.kodak), max(args.bpp), cfg, args.effort)
    eager = dataclasses.replace(cfg, step_graph=False)  # the steps launched one by one from Python
    single = fit.Fitter(target, arch, device, eff, eager, 0)
    res = {"arch": {"widths": arch.widths, "mod_widths": arch.mod_widths, "params": arch.num_params()},
           "device": device, "pixels_per_step": len(single.sample()[0]) * len(single.sample()[1])}
    fitters = {"torch_nif_s": single, "torch_stacked_s": BatchFitter([target], arch, device, eff, eager, 0)}
    cuda = device.startswith("cuda")
    if cuda:
        fitters["fused_stacked_s"] = BatchFitter([target], arch, device, eff, eager, 0, use_fused=True)
        fitters["graphed_nif_s"] = fit.Fitter(target, arch, device, eff, cfg, 0)  # the encoder's default on CUDA
        fused = dataclasses.replace(cfg, fused_network=True)
        fitters["fused_nif_s"] = fit.Fitter(target, arch, device, eff, dataclasses.replace(fused, step_graph=False), 0)
        fitters["graphed_fused_nif_s"] = fit.Fitter(target, arch, device, eff, fused, 0)
        # TF32 products (FitConfig.tf32; their PSNR cost emulated on a CPU by tf32_fit.py), replayed: Muon's alone,
        # then every product of both paths
        for k, c, mode in (("graphed_tf32_muon_nif_s", cfg, "muon"), ("graphed_tf32_nif_s", cfg, "all"),
                           ("graphed_fused_tf32_nif_s", fused, "all")):
            fitters[k] = fit.Fitter(target, arch, device, eff, dataclasses.replace(c, tf32=mode), 0)
    rounds = {k: [] for k in fitters}
    for _ in range(3):  # interleaved rounds, best of each: the machine may be shared
        for k, f in fitters.items():
            timer = graphed_step_time if k.startswith("graphed") else lambda f, n, d: step_time(f, n, d, 1)
            rounds[k].append(timer(f, args.steps, device))
    res.update({k: min(v) for k, v in rounds.items()})
    if cuda:
        res["fused_speedup_vs_torch_nif"] = res["torch_nif_s"] / res["fused_stacked_s"]
        res["fused_speedup_vs_torch_stacked"] = res["torch_stacked_s"] / res["fused_stacked_s"]
        res["graphed_speedup_vs_torch_nif"] = res["torch_nif_s"] / res["graphed_nif_s"]
        res["fused_nif_speedup_vs_torch_nif"] = res["torch_nif_s"] / res["fused_nif_s"]
        res["graphed_fused_speedup_vs_graphed"] = res["graphed_nif_s"] / res["graphed_fused_nif_s"]
        res["tf32_muon_speedup_vs_graphed"] = res["graphed_nif_s"] / res["graphed_tf32_muon_nif_s"]
        res["tf32_speedup_vs_graphed"] = res["graphed_nif_s"] / res["graphed_tf32_nif_s"]
        res["fused_tf32_speedup_vs_graphed_fused"] = res["graphed_fused_nif_s"] / res["graphed_fused_tf32_nif_s"]
        # 6 float operations per parameter per pixel (forward 2, backward 4), against the device's fp32 rate
        for k in ("graphed_nif_s", "graphed_fused_nif_s", "graphed_tf32_muon_nif_s", "graphed_tf32_nif_s",
                  "graphed_fused_tf32_nif_s"):
            res[k[:-2] + "_tflops"] = 6 * arch.num_params() * res["pixels_per_step"] / res[k] / 1e12
    else:
        for k in ("fused_stacked_s", "graphed_nif_s", "fused_nif_s", "graphed_fused_nif_s", "graphed_tf32_muon_nif_s",
                  "graphed_tf32_nif_s", "graphed_fused_tf32_nif_s"):
            res[k] = None
        res["note"] = "no CUDA: the fused Triton steps and the CUDA-graph steps are skipped"
    out["step"] = res
    print(json.dumps(res), file=sys.stderr)


def section_tiles(args, out: dict) -> None:
    """The fused training pass's tile shapes (kernels/nif_train.py's GPU_BLOCKS, GPU_WARPS: chosen by their compiled
    registers alone), each replayed from CUDA graphs on the step section's network: seconds per step by
    'pixels x tile width / warps'."""
    device = resolve_device(args.device)
    if not device.startswith("cuda"):
        out["tiles"] = {"note": "no CUDA: skipped"}
        return
    from pillow_nif.kernels import nif_train

    cfg = dataclasses.replace(fit.FitConfig(), fused_network=True)
    target, arch, eff = target_and_arch(kodak_image(args.kodak), max(args.bpp), cfg, args.effort)
    saved = nif_train.GPU_BLOCKS, nif_train.GPU_WARPS
    res = {"default": f"{saved[0][0]}x{saved[0][1]}/{saved[1]}"}
    try:
        for bp, bt, warps in ((32, 16, 4), (64, 16, 4), (16, 16, 2), (32, 32, 8)):
            nif_train.GPU_BLOCKS, nif_train.GPU_WARPS = (bp, bt), warps
            f = fit.Fitter(target, arch, device, eff, cfg, 0)
            res[f"{bp}x{bt}/{warps}"] = graphed_step_time(f, args.steps, device)
            out["tiles"] = res
            print(json.dumps(res), file=sys.stderr)
    finally:
        nif_train.GPU_BLOCKS, nif_train.GPU_WARPS = saved


def batch_images(args) -> list[Image.Image]:
    names = sorted(p.name for p in KODAK.glob("*.png"))
    return [crop(kodak_image(names[i % len(names)]), args.batch_size) for i in range(args.batch_n)]


def section_batch(args, out: dict, tmp: str) -> None:
    ims = batch_images(args)
    opts = dict(bpp=args.batch_bpp, effort=args.effort, device=args.device, seed=0)
    fused = dict(use_fused=True) if args.batch_fused else {}
    pillow_nif.encode(crop(ims[0], 32), bpp=8, effort=1, device=args.device)  # warm-up (imports, allocator)
    if fused:
        pillow_nif.encode_many(ims[:1], **{**opts, "effort": 1}, **fused)  # Triton compilation
    t = time.perf_counter()
    many = pillow_nif.encode_many(ims, **opts, **fused)
    for i, data in enumerate(many):
        write_atomic(os.path.join(tmp, f"b{i}.nif"), data)
    t_many = time.perf_counter() - t
    n_single = len(ims) if args.single_n is None else min(len(ims), args.single_n)
    t = time.perf_counter()
    single = [timed_encode(im, os.path.join(tmp, f"s{i}.nif"), **opts)[1] for i, im in enumerate(ims[:n_single])]
    t_single = time.perf_counter() - t
    p_many = [psnr(d, im) for d, im in zip(many, ims)]
    p_single = [psnr(d, im) for d, im in zip(single, ims)]
    res = {"n": len(ims), "n_one_at_a_time": n_single, "size": args.batch_size, "bpp": args.batch_bpp,
           "effort": args.effort, "fused": bool(fused), "encode_many_s": t_many,
           "encode_many_images_per_s": len(ims) / t_many, "encode_many_mean_psnr_all": statistics.mean(p_many),
           "max_bpp": max(len(d) * 8 / (im.width * im.height) for d, im in zip(many, ims))}
    if n_single:  # per image, so that a one-at-a-time subset compares with the whole batch
        res.update({"one_at_a_time_s": t_single, "one_at_a_time_images_per_s": n_single / t_single,
                    "speedup": (t_single / n_single) / (t_many / len(ims)),
                    "encode_many_mean_psnr": statistics.mean(p_many[:n_single]),
                    "one_at_a_time_mean_psnr": statistics.mean(p_single),
                    "identical_files": sum(a == b for a, b in zip(many, single))})
    out["batch"] = res
    print(json.dumps(res), file=sys.stderr)


class VmapNIF(torch.nn.Module):
    """B NIF networks stacked with torch.func.stack_module_state, run with vmap over functional_call."""

    def __init__(self, models):
        super().__init__()
        from torch.func import stack_module_state

        params, _ = stack_module_state(models)
        self.names = list(params)
        self.stack = torch.nn.ParameterList(torch.nn.Parameter(params[n]) for n in self.names)
        self.base = [models[0]]  # not a submodule: only its structure is used
        self.arch = models[0].arch

    def named_tensors(self):  # what fit.Fitter.optimizer reads, as StackedNIF has it
        return list(zip(self.names, self.stack))

    def forward(self, ys, xs, weights=None):
        from torch.func import functional_call, vmap

        params = dict(zip(self.names, self.stack))
        out = vmap(lambda p: functional_call(self.base[0], p, (ys, xs)))(params)  # (B, Hs, Ws, C)
        return out.permute(1, 2, 0, 3).reshape(len(ys), len(xs), -1)


def section_forward(args, out: dict) -> None:
    cfg = fit.FitConfig()
    device = resolve_device(args.device)
    ims = batch_images(args)
    plans = [target_and_arch(im, args.batch_bpp, cfg, args.effort) for im in ims]
    targets, arch, eff = [p[0] for p in plans], plans[0][1], plans[0][2]
    bmm = BatchFitter(targets, arch, device, eff, cfg, 0)
    vm = BatchFitter(targets, arch, device, eff, cfg, 0)
    vm.model = VmapNIF([bmm.model.unstack(i) for i in range(len(targets))]).to(device)
    singles = [fit.Fitter(t, arch, device, eff, cfg, 0) for t in targets]
    for f in singles:
        f.sampler = None
    bmm.sampler = vm.sampler = None  # the three compared on the same strided grids (vmap's forward has no draws)
    # Interleaved rounds, best of each: the machine may be shared.
    rounds = {"bmm_s": [], "vmap_s": [], "one_by_one_s": []}
    for _ in range(3):
        rounds["bmm_s"].append(step_time(bmm, args.steps, device, 1))
        rounds["vmap_s"].append(step_time(vm, args.steps, device, 1))
        rounds["one_by_one_s"].append(sum(step_time(f, args.steps, device, 1) for f in singles))
    res = {"n": len(targets), "arch": {"widths": arch.widths, "mod_widths": arch.mod_widths},
           "pixels_per_step": len(bmm.sample()[0]) * len(bmm.sample()[1]), "device": device}
    res.update({k: min(v) for k, v in rounds.items()})
    res["vmap_over_bmm"] = res["vmap_s"] / res["bmm_s"]
    res["one_by_one_over_bmm"] = res["one_by_one_s"] / res["bmm_s"]
    out["forward"] = res
    print(json.dumps(res), file=sys.stderr)


def section_cpu(args, out: dict, tmp: str) -> None:
    im = crop(kodak_image(args.kodak), args.cpu_size)
    s, data = timed_encode(im, os.path.join(tmp, "c.nif"), bpp=args.batch_bpp, effort=args.cpu_effort, device="cpu")
    out["cpu"] = {"size": args.cpu_size, "bpp_target": args.batch_bpp, "effort": args.cpu_effort, "seconds": s,
                  "bpp": len(data) * 8 / (im.width * im.height), "psnr": psnr(data, im)}
    print(json.dumps(out["cpu"]), file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--device", default="auto")
    p.add_argument("--effort", type=int, default=5, help="effort of every encode (default 5, the default)")
    p.add_argument("--kodak", default="kodim23.png", help="image of ../shared/datasets/kodak for kodak/step/cpu")
    p.add_argument("--bpp", type=float, nargs="+", default=[0.3, 1.0])
    p.add_argument("--steps", type=int, default=20, help="timed training steps per measurement")
    p.add_argument("--batch-n", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batch-bpp", type=float, default=0.6)
    p.add_argument("--single-n", type=int,
                   help="one-at-a-time encodes of the first N batch images only (0: none; default: all)")
    p.add_argument("--kodak-fused", action="store_true",
                   help="the kodak section also encodes with the fused Triton training pass (CUDA)")
    p.add_argument("--batch-fused", action="store_true", help="encode_many with the fused Triton layer (CUDA)")
    p.add_argument("--cpu-size", type=int, default=256)
    p.add_argument("--cpu-effort", type=int, help="effort of the cpu section (default: --effort)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: " + ",".join(SECTIONS))
    args = p.parse_args(argv)
    args.cpu_effort = args.cpu_effort or args.effort
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SECTIONS):
        p.error(f"unknown sections {sorted(skip - set(SECTIONS))}")
    if not KODAK.exists():
        p.error(f"{KODAK} not found")
    device = resolve_device(args.device)
    report = {
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "device": device,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "machine": machine_info(device),  # versions (Triton's too), the commit and the source hash
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in SECTIONS:
            if name in skip:
                continue
            if name in ("kodak", "batch", "cpu"):
                globals()[f"section_{name}"](args, report, tmp)
            else:
                globals()[f"section_{name}"](args, report)
            if args.out:
                write_atomic(args.out, (json.dumps(report, indent=2) + "\n").encode())
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
