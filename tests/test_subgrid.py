"""The training step's network (subgrid.SubgridNetwork) against the reference, model.NIF.forward_grid."""

import pytest
import torch

from pillow_nif.fit import pixel_axes
from pillow_nif.quant import fake_quantize
from pillow_nif.subgrid import SubgridNetwork
from test_model import ARCHS, trained_like

H, W = 23, 17  # neither divisible by the strides below, so phases give sub-grids of different sizes


def assert_same_gradients(m, got, ref, target):
    """The parameters' gradients of the squared error through `got` equal those through the reference `ref`."""
    params = list(m.parameters())
    g_ref = torch.autograd.grad(((ref - target) ** 2).mean(), params)
    g_got = torch.autograd.grad(((got - target) ** 2).mean(), params)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stride,py,px", [(1, 0, 0), (3, 2, 1), (4, 0, 3)])
def test_values_and_gradients_match_the_reference(arch, stride, py, px):
    m = trained_like(arch).double()
    rows, cols = range(py, H, stride), range(px, W, stride)
    ys, xs = (t.double() for t in pixel_axes(H, W, rows, cols, "cpu"))
    target = torch.randn(len(rows), len(cols), arch.channels, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = m(ys, xs)
    net = SubgridNetwork(arch, H, W, "cpu", torch.float64)
    out = net.forward(dict(m.named_tensors()), rows, cols)
    assert out.shape == (arch.channels, len(rows) * len(cols))
    got = out.T.reshape(ref.shape)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    assert_same_gradients(m, got, ref, target)


def test_substituted_tensors_carry_their_gradient_to_the_parameters():
    """Quantisation-aware tuning hands fake-quantised tensors in: the straight-through gradient must reach the weights."""
    arch = ARCHS[0]
    m = trained_like(arch)
    q = {n: fake_quantize(t, 0.01, 1000) for n, t in m.named_tensors()}
    rows, cols = range(1, H, 2), range(0, W, 2)
    net = SubgridNetwork(arch, H, W, "cpu")
    loss = net.forward(q, rows, cols).square().mean()
    grads = torch.autograd.grad(loss, list(m.parameters()))
    ref = torch.autograd.grad(m(*pixel_axes(H, W, rows, cols, "cpu"), q).square().mean(), list(m.parameters()))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)



@pytest.mark.parametrize("arch", ARCHS)
def test_a_drawn_sample_matches_the_reference_at_its_pixels(arch):
    """sampling.py's draws: rows with repeats, each row its own (repeating) columns, against the reference at those
    pixels, values and gradients."""
    m = trained_like(arch).double()
    rows = torch.tensor([0, 4, 4, 9, 22])
    cols = torch.tensor([[0, 3, 3, 16], [1, 2, 8, 9], [1, 5, 6, 7], [0, 0, 11, 12], [2, 9, 15, 16]])
    ys, xs = (t.double() for t in pixel_axes(H, W, range(H), range(W), "cpu"))
    coords = torch.stack([ys[rows[:, None]].expand_as(cols), xs[cols]], -1).reshape(-1, 2)
    ref = m.forward_points(coords)
    net = SubgridNetwork(arch, H, W, "cpu", torch.float64)
    got = net.forward(dict(m.named_tensors()), rows, cols).T
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    target = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert_same_gradients(m, got, ref, target)


def test_both_ways_of_the_drawn_columns_gradient_agree():
    """The CPU sums each column's gradients first; CUDA (deterministic without atomics) multiplies per pixel."""
    from pillow_nif.subgrid import drawn_columns_gradient

    g = torch.Generator().manual_seed(2)
    grad, ex = torch.randn(7, 40, dtype=torch.float64, generator=g), torch.randn(W, 9, dtype=torch.float64, generator=g)
    cols = torch.randint(W, (40,), generator=g)
    scattered, gathered = (drawn_columns_gradient(grad, ex, cols, scatter) for scatter in (True, False))
    torch.testing.assert_close(scattered, gathered)
