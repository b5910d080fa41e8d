"""Decode speed: torch eager (CPU, GPU) against the fused Triton kernel (GPU), JSON on stdout.

    python benchmarks/decode_speed.py [--out speed.json] [--sizes 768x512,4096x2731] [--no-cpu] [--tune]

Times are medians after warm-up: time.perf_counter on the CPU, triton.testing.do_bench on the GPU.
GFLOP/s counts the network's real multiply-adds (2 flops each, sines not counted), not the padding the
kernel also computes (reported as padded_flops_per_pixel). GPU parts are skipped without CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from pillow_nif.bitstream import Architecture
from pillow_nif.model import NIF, evaluate_folded, fold, pixel_grid, to_pixels
from pillow_nif.render import render
from rd import machine_info  # benchmarks/rd.py, beside this script

# Roughly 0.3, 1.0 and 2.0 bits per pixel at 768x512 (about 8 bits per quantised parameter).
MODELS = {
    "0.3bpp": Architecture(3, (96, 40, 24, 16), 14, 1.4, 30.0, (16, 8), 4, 30.0, 10.0),
    "1.0bpp": Architecture(3, (200, 84, 40, 18), 14, 1.4, 30.0, (32, 16, 8), 4, 30.0, 10.0),
    "2.0bpp": Architecture(3, (300, 126, 60, 27), 14, 1.4, 30.0, (48, 16, 8), 4, 30.0, 10.0),
}
SIZES = [(768, 512), (4096, 2731)]
CPU_BAND = 1 << 16  # pixels per evaluate_folded call: bounds eager memory, as render.py does
GPU_BAND = 1 << 21
PRECISIONS = ("ieee", "tf32x3")
TUNE = [(16, 4), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)]  # (block_m, num_warps) tried by --tune


def flops_per_pixel(arch: Architecture) -> int:
    dims = [arch.pe_dim, *arch.widths, arch.channels]
    mdims = [arch.mod_pe_dim, *arch.mod_widths, 1] if arch.mod_widths else []
    return 2 * sum(a * b for d in (dims, mdims) for a, b in zip(d, d[1:]))


def eager(net, width: int, height: int, out: torch.Tensor, band: int, stop: int | None = None) -> None:
    """Rows [0, stop) of the decode into out, band pixels at a time."""
    stop = height if stop is None else stop
    rows = max(1, band // width)
    for r0 in range(0, stop, rows):
        r1 = min(stop, r0 + rows)
        v = to_pixels(evaluate_folded(net, pixel_grid(width, height, slice(r0, r1), device=out.device)))
        out[r0:r1] = v.reshape(r1 - r0, width, -1).to(out.dtype)


def cpu_median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gpu_median(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def bench(name: str, arch: Architecture, width: int, height: int, args) -> dict:
    net = fold(NIF(arch).initialize(torch.Generator().manual_seed(0)), 1, 255)
    flops = flops_per_pixel(arch) * width * height
    res = {"model": name, "widths": arch.widths, "mod_widths": arch.mod_widths, "pe_freqs": arch.pe_freqs,
           "params": arch.num_params(), "size": [width, height], "flops_per_pixel": flops_per_pixel(arch)}  # fmt: skip
    gflops = lambda s: flops / s / 1e9  # noqa: E731
    if not args.no_cpu:
        # Eager cost is linear in pixels: time at most --cpu-pixels of the rows and scale up.
        rows = min(height, max(1, args.cpu_pixels // width))
        out = torch.empty(rows, width, 3, dtype=torch.uint8)
        s = cpu_median(lambda: eager(net, width, height, out, CPU_BAND, rows), args.cpu_repeats) * height / rows
        res["cpu_eager_s"], res["cpu_eager_gflops"] = s, gflops(s)
        if rows < height:
            res["cpu_eager_timed_rows"] = rows
        # What a user's CPU decode runs: render.render (separable first layers, in-place ops, bands).
        if width * height <= args.cpu_pixels:
            s = cpu_median(lambda: render(net, width, height), args.cpu_repeats)
            res["cpu_render_s"], res["cpu_render_gflops"] = s, gflops(s)
    if torch.cuda.is_available():
        from pillow_nif.kernels.nif_decode import pack, render_band

        gnet = net.to("cuda")
        ref = torch.empty(height, width, 3, dtype=torch.uint8, device="cuda")
        s = gpu_median(lambda: eager(gnet, width, height, ref, GPU_BAND))
        res["gpu_eager_s"], res["gpu_eager_gflops"] = s, gflops(s)
        res["padded_flops_per_pixel"] = 2 * pack(gnet).macs
        for prec in PRECISIONS:
            out = torch.empty_like(ref)
            render_band(gnet, width, height, 0, height, out=out, precision=prec)  # compile
            s = gpu_median(lambda: render_band(gnet, width, height, 0, height, out=out, precision=prec))
            diff = (out.int() - ref.int()).abs()
            res[f"triton_{prec}"] = {
                "s": s, "gflops": gflops(s), "speedup_vs_gpu_eager": res["gpu_eager_s"] / s,
                "max_diff_vs_eager": diff.max().item(), "identical_vs_eager": (diff == 0).float().mean().item(),
            }  # fmt: skip
            if "cpu_eager_s" in res:
                res[f"triton_{prec}"]["speedup_vs_cpu_eager"] = res["cpu_eager_s"] / s
            if args.tune:  # each configuration compiles anew (~10-30 s)
                kw = dict(out=out, precision=prec)
                res[f"triton_{prec}"]["tune_s"] = {
                    f"block_m={bm},num_warps={nw}": gpu_median(
                        lambda: render_band(gnet, width, height, 0, height, block_m=bm, num_warps=nw, **kw)
                    )
                    for bm, nw in TUNE
                }
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZES), help="WxH,WxH,...")
    p.add_argument("--models", default=",".join(MODELS), help="subset of " + ",".join(MODELS))
    p.add_argument("--no-cpu", action="store_true", help="skip the (slow) CPU eager baseline")
    p.add_argument("--cpu-repeats", type=int, default=3)
    p.add_argument("--cpu-pixels", type=int, default=1 << 20, help="time the CPU on at most this many pixels' rows")
    p.add_argument("--tune", action="store_true", help=f"also time the kernel at (block_m, num_warps) in {TUNE}")
    args = p.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    report = {
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "machine": machine_info("cuda" if torch.cuda.is_available() else "cpu"),
        "results": [],
    }
    if not torch.cuda.is_available():
        report["note"] = "no CUDA device: GPU eager and Triton skipped"
    with torch.inference_mode():
        for name in args.models.split(","):
            for w, h in sizes:
                report["results"].append(bench(name, MODELS[name], w, h, args))
                print(json.dumps(report["results"][-1]), file=sys.stderr)  # progress
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
