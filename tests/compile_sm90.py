"""Compile every Triton kernel for an H100 / H200 (sm_90) with the installed Triton, on a machine without a GPU.

    python tests/compile_sm90.py        # run by tests/test_kernels_compile.py in a fresh process

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not Triton's compiler, so it accepts code that
the compiler rejects: Triton 3.6 failed on the decoder's nested constexpr tuples that 3.9 and the interpreter took,
and every GPU decode failed with it. Here Triton's front end, its optimiser and ptxas (shipped in its wheel) build
the kernels as a GPU launch would, at the GPU's tile sizes; nothing is launched. A stand-in for Triton's CUDA
driver answers "device 0, sm_90" without a GPU. Exit status 0: all compiled; 1: a kernel failed to compile;
3: this Triton's driver interface is not the one the stand-in knows (the caller skips).
"""

import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")

import torch  # noqa: E402

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
except ImportError as e:
    print(f"SKIP: {e}")
    sys.exit(3)


class _NoGPU:
    """What JITFunction.run asks of the active driver before it compiles, answered for one sm_90 device."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


def _compile_only(run):
    def wrapped(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)  # compile; never launch

    return wrapped


def main() -> int:
    try:
        driver.set_active(_NoGPU())
        JITFunction.run = _compile_only(JITFunction.run)
    except (AttributeError, TypeError) as e:
        print(f"SKIP: Triton {triton.__version__}'s driver interface: {e}")
        return 3
    from pillow_nif.bitstream import Architecture
    from pillow_nif.kernels import nif_decode, nif_train, sine_layer
    from pillow_nif.model import NIF, fold

    # The CPU stands in for the GPU's memory: let the decoder take CPU weights, at the GPU's tile sizes.
    nif_decode._interpreting = lambda: True
    sine_layer._blocks = lambda n, m, k, device: tuple(
        sine_layer._block(v, cap) for v, cap in zip((n, m, k), sine_layer.GPU_BLOCKS)
    )
    nif_train._interpreting = lambda: True
    nif_train.INTERPRET_BLOCKS, nif_train.INTERPRET_PROGRAMS = nif_train.GPU_BLOCKS, nif_train.GPU_PROGRAMS
    g = torch.Generator().manual_seed(0)
    decoders = {  # each layout the packer makes: whole layers, a streamed layer, no modulation, 16-bit, raw
        "0.3 bpp (whole layers)": (Architecture(3, (96, 40, 24, 16), 14, 1.4, 30.0, (16, 8), 4, 30.0, 10.0), 255, {}),
        "wide first layer (streamed)": (Architecture(3, (360, 150, 70), 14, 1.4, 30.0, (32, 16), 4, 30.0, 10.0), 255,
                                        {}),
        "no modulation, 16-bit": (Architecture(3, (48, 24), 8, 1.4, 30.0), 65535, {}),
        "raw values (post-filter)": (Architecture(4, (40, 20), 6, 1.4, 30.0, (8,), 3, 30.0, 10.0), 255,
                                     {"raw": True}),
    }
    failed = 0
    for name, (arch, maxval, opts) in decoders.items():
        net = fold(NIF(arch).initialize(g), 0, float(maxval))
        failed += _try(f"decoder, {name}", lambda: nif_decode.render_band(
            net, 64, 8, 0, 8, block_m=nif_decode.gpu_block_m(nif_decode.pack(net)), **opts))
    for name, period in (("per-row period", torch.rand(2, 300, 1) + 29.5), ("constant period", 30.0)):
        x = torch.rand(2, 300, 40, requires_grad=True)
        w = torch.rand(2, 40, 24, requires_grad=True)
        b = torch.rand(2, 24, requires_grad=True)
        p = period.requires_grad_() if isinstance(period, torch.Tensor) else period
        failed += _try(f"sine layer forward and backward, {name}",
                       lambda: sine_layer.sine_layer(x, w, b, p).sum().backward())
    modulated = Architecture(3, (312, 141, 78, 78), 14, 1.4, 30.0, (32, 16, 8), 4, 30.0, 10.0)
    for name, arch, rows, cols, precision in (
        ("modulated, a drawn sample", modulated, torch.randint(0, 64, (48,)), torch.randint(0, 96, (48, 128)), "ieee"),
        ("plain, a strided grid", Architecture(3, (96, 40, 24, 16), 14, 1.4, 30.0), range(0, 64, 2), range(1, 96, 2),
         "ieee"),
        ("TF32 (FitConfig.tf32)", modulated, range(0, 64, 2), range(1, 96, 2), "tf32"),
    ):
        t = {n: p.detach().requires_grad_() for n, p in NIF(arch).initialize(g).named_tensors()}
        net = nif_train.FusedNetwork(arch, 64, 96, "cpu", precision)
        failed += _try(f"training pass forward and backward, {name}",
                       lambda: net.forward(t, rows, cols).sum().backward())
    return 1 if failed else 0


def _try(name, fn) -> int:
    t = time.perf_counter()
    try:
        fn()
    except Exception as e:  # the compiler's error, with the kernel line it points at
        while e.__cause__ is not None:
            e = e.__cause__
        print(f"FAILED {name}: {type(e).__name__}: {e}")
        return 1
    print(f"compiled {name} in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    print(f"Triton {triton.__version__}, target sm_90")
    sys.exit(main())
