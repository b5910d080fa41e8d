"""The fused sine-layer kernel (forward and backward) against torch autograd, in the interpreter without CUDA.

Shapes and weights are random, fresh each run, odd sizes included (edges, single rows, K or M of 1);
weights are drawn like a trained SIREN's (arguments of the sine spanning several periods). A failure
prints the seed to replay it with NIF_TEST_SEED. Tolerance: relative error <= 1e-4 in fp32, for the output and
each of the four gradients, against autograd in float64 (the exact values), relative to the size of the terms
each value sums (see magnitudes()).
"""

import math
import os
import random

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
pytest.importorskip("triton")

from pillow_nif.batch import StackedNIF  # noqa: E402
from pillow_nif.bitstream import Architecture  # noqa: E402
from pillow_nif.kernels.sine_layer import reference, sine_layer  # noqa: E402
from pillow_nif.model import NIF  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = int(os.environ.get("NIF_TEST_SEED", random.randrange(2**31)))
TOL = 1e-4


def inputs(g, batch, n, k, m, period_kind):
    """x like a sine layer's output, W and b at 3x SIREN's bound for a width-k layer, period ~30 +- 10."""
    lead = (batch,) if batch else ()
    x = torch.rand(*lead, n, k, generator=g) * 2 - 1
    bound = 3 * math.sqrt(6 / k) / 30
    w = (torch.rand(*lead, k, m, generator=g) * 2 - 1) * bound
    b = (torch.rand(*lead, m, generator=g) * 2 - 1) * bound
    if period_kind == "tensor":
        period = 30 + 10 * (torch.rand(*lead, n, 1, generator=g) * 2 - 1)
    else:
        period = 30.0
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in (x, w, b, period)]


def rel_err(a, ref, scale=None):
    """max |a - ref| / max scale: scale is |ref| unless given."""
    scale = ref.abs() if scale is None else scale
    return float((a - ref).abs().max() / scale.max().clamp_min(1e-30))


def magnitudes(x, w, b, period, dy):
    """Each output's and gradient's sum of the absolute values of its terms (float64): what an fp32 result's
    rounding error is proportional to. A gradient that is a sum of terms cancelling to nearly nothing has no
    relative accuracy in fp32, autograd's included: seed 1272153333 drew one row (N = 1), whose single dperiod
    sums 16 terms; fp32 autograd was 7.1e-4 off the exact value relative to it, the kernel 2.7e-4."""
    x, w, b, dy = (t.double() for t in (x, w, b, dy))
    p = period.double() if isinstance(period, torch.Tensor) else period
    z = torch.matmul(x, w) + b.unsqueeze(-2)
    arg = p * (torch.matmul(x.abs(), w.abs()) + b.abs().unsqueeze(-2))
    g = (dy * torch.cos(p * z)).abs()
    out = [arg, torch.matmul(g * p, w.abs().transpose(-1, -2)), torch.matmul(x.abs().transpose(-1, -2), g * p),
           (g * p).sum(-2)]
    return out + ([(g * z.abs()).sum(-1, keepdim=True)] if isinstance(period, torch.Tensor) else [])


def check(batch, n, k, m, period_kind, seed):
    g = torch.Generator().manual_seed(seed)
    args = inputs(g, batch, n, k, m, period_kind)
    dy = torch.randn(*args[0].shape[:-1], m, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    results = []
    for fn, dtype in ((sine_layer, torch.float32), (reference, torch.float64)):
        leaves = [t.detach().to(dtype).clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in args]
        y = fn(*leaves)
        y.backward(dy.to(dtype))
        results.append([y.detach()] + [t.grad for t in leaves if isinstance(t, torch.Tensor)])
    names = ["y", "dx", "dW", "db", "dperiod"]
    msg = f"shape B={batch} N={n} K={k} M={m} period={period_kind}; replay with NIF_TEST_SEED={SEED}"
    for name, got, want, scale in zip(names, *results, magnitudes(*args, dy)):
        assert got.dtype == torch.float32 and got.shape == want.shape, f"{name}: {got.dtype} {tuple(got.shape)}; {msg}"
        err = rel_err(got.double(), want, scale)
        assert err <= TOL, f"{name}: relative error {err:.2e} > {TOL}; {msg}"


def random_shapes(rng, count):
    """Odd sizes mostly, sometimes the 16-multiples the blocks are made of, and degenerate 1s."""
    pick = lambda hi: rng.choice([1, 16, 32, rng.randrange(2, hi), rng.randrange(2, hi)])  # noqa: E731
    return [(rng.choice([0, 1, 3]), rng.choice([1, rng.randrange(2, 700)]), pick(90), pick(140),
             rng.choice(["tensor", "float"])) for _ in range(count)]


@pytest.mark.parametrize("case", range(6))
def test_random_shapes_match_autograd(case):
    rng = random.Random(SEED + case)
    for batch, n, k, m, period_kind in random_shapes(rng, 2):
        check(batch, n, k, m, period_kind, rng.randrange(2**31))


def test_multi_block_reduction():
    """More rows, K and M than one block of each (the interpreter's blocks are 256 x 128 x 128): the
    K loop, the M loop and the two-stage weight reduction over several row groups are all exercised."""
    check(2, 1100, 150, 200, "tensor", SEED)


def test_no_grad_needed_for_weights():
    g = torch.Generator().manual_seed(SEED)
    x, w, b, period = inputs(g, 0, 40, 20, 30, "tensor")
    x.requires_grad_(True)
    y = sine_layer(x, w, b, period)
    y.sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    reference(xr, w, b, period).sum().backward()
    assert rel_err(x.grad, xr.grad) <= TOL


def test_bad_shapes_are_refused():
    x = torch.zeros(5, 4, device=DEVICE)
    with pytest.raises(ValueError):
        sine_layer(x, torch.zeros(3, 6, device=DEVICE), torch.zeros(6, device=DEVICE), 30.0)
    with pytest.raises(ValueError):
        sine_layer(x, torch.zeros(4, 6, device=DEVICE), torch.zeros(6, device=DEVICE), torch.ones(5, 2, device=DEVICE))
    with pytest.raises(ValueError):
        sine_layer(x.double(), torch.zeros(4, 6, device=DEVICE).double(), torch.zeros(6, device=DEVICE).double(), 30.0)


def test_stacked_nif_with_the_fused_layer_trains_like_torch():
    """The batch encoder's use_fused switch: same outputs and parameter gradients as its torch path."""
    arch = Architecture(3, (40, 20, 10), 3, 1.4, 45.0, (12, 6), 2, 45.0, 10.0)
    nets = [NIF(arch).initialize(torch.Generator().manual_seed(SEED + i)) for i in range(2)]
    ys, xs = torch.linspace(-1, 1, 19, device=DEVICE), torch.linspace(-1, 1, 23, device=DEVICE)
    grads = []
    for fused in (True, False):
        model = StackedNIF(nets, use_fused=fused).to(DEVICE)
        out = model(ys, xs)
        (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).reshape(out.shape)).sum().backward()
        grads.append([out.detach()] + [p.grad for _, p in model.named_tensors()])
    names = ["out"] + [n for n, _ in nets[0].named_tensors()]
    for name, got, want in zip(names, *grads):
        err = rel_err(got, want)
        assert err <= TOL, f"{name}: relative error {err:.2e}; replay with NIF_TEST_SEED={SEED}"
