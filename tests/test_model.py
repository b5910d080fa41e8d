import math

import pytest
import torch

from pillow_nif.bitstream import COLOUR_IDENTITY, COLOUR_YCBCR, Architecture
from pillow_nif.model import NIF, evaluate_folded, fold, pixel_grid

ARCHS = [
    Architecture(3, (24, 10, 6, 4), 6, 1.4, 30.0, (8, 4), 3, 30.0, 10.0),
    Architecture(1, (16,), 0, 1.4, 30.0),
    Architecture(4, (20, 9), 5, 1.4, 20.0, (6,), 2, 25.0, 3.0),
]


def trained_like(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = NIF(arch).initialize(g)
    with torch.no_grad():  # make the modulation matter, as after training
        for p in m.modulation.parameters():
            p.mul_(5)
    return m


def test_pixel_grid_uses_pixel_centres():
    g = pixel_grid(4, 2)
    assert g.shape == (8, 2)
    assert torch.allclose(g[0], torch.tensor([-0.5, -0.75])) and torch.allclose(g[-1], torch.tensor([0.5, 0.75]))
    assert torch.equal(pixel_grid(1, 1), torch.zeros(1, 2))
    assert torch.equal(pixel_grid(5, 7, slice(2, 4)), pixel_grid(5, 7)[10:20])


@pytest.mark.parametrize("arch", ARCHS)
def test_separable_grid_forward_equals_pointwise_reference(arch):
    m = trained_like(arch)
    ys = (2 * torch.arange(13) + 1) / 13 - 1
    xs = (2 * torch.arange(9) + 1) / 9 - 1
    grid = m(ys.float(), xs.float()).reshape(-1, arch.channels)
    points = m.forward_points(pixel_grid(9, 13))
    assert torch.allclose(grid, points, atol=2e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_evaluation_without_autograd_gives_the_same_bits_and_leaves_the_weights(arch):
    # The encoder's MSE measurements run the grid forward under no_grad, which writes its sines over temporaries.
    m = trained_like(arch)
    before = {n: t.detach().clone() for n, t in m.named_tensors()}
    ys, xs = torch.linspace(-0.9, 0.9, 11), torch.linspace(-0.8, 0.8, 7)
    with torch.no_grad():
        fast = m(ys, xs)
        substituted = m(ys, xs, {n: t * 1.0 for n, t in m.named_tensors()})
    assert torch.equal(fast, m(ys, xs).detach()) and torch.equal(fast, substituted)
    assert all(torch.equal(t, before[n]) for n, t in m.named_tensors())


def test_sin_of_product_gradients_match_autograd():
    from pillow_nif.model import sin_of_product

    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    p = (3 + torch.randn(5, 7, 1, dtype=torch.float64, generator=g)).requires_grad_()
    assert torch.autograd.gradcheck(sin_of_product, (z, p))
    # Gradients of the training forward (grid, modulation) against plain torch ops.
    m = trained_like(ARCHS[0])
    ys, xs = torch.linspace(-0.9, 0.9, 11), torch.linspace(-0.8, 0.8, 6)
    loss = m(ys, xs).square().mean()
    fused = torch.autograd.grad(loss, list(m.parameters()))
    plain = torch.autograd.grad(m.forward_points(torch.cartesian_prod(ys, xs)).square().mean(), list(m.parameters()))
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "arch,colour", [(a, c) for a in ARCHS for c in (COLOUR_IDENTITY, COLOUR_YCBCR) if a.channels >= 3 or not c]
)
def test_folded_network_computes_the_same_pixels(arch, colour):
    from pillow_nif.colour import inverse_matrix

    m = trained_like(arch)
    coords = pixel_grid(11, 7)
    with torch.no_grad():
        net = m.forward_points(coords).double()
    v = (net + 1) / 2
    if colour:
        inv, off = inverse_matrix(colour)
        v[:, :3] = v[:, :3] @ inv.T + off
    expected = (v * 255).clamp(0, 255)
    got = evaluate_folded(fold(m, colour, 255.0), coords)
    assert torch.allclose(got.double(), expected, atol=2e-3)


def test_siren_initialisation_ranges():
    arch = ARCHS[0]
    m = NIF(arch).initialize(torch.Generator().manual_seed(0))
    first = m.genesis[0].weight
    assert first.abs().max() <= 1 / arch.pe_dim
    hidden = m.genesis[1].weight
    assert hidden.abs().max() <= math.sqrt(6 / arch.widths[0]) / arch.omega
    assert m.modulation[-1].bias.abs().max() == 0  # starts as a plain SIREN (period = omega)


@pytest.mark.parametrize("arch", ARCHS + [Architecture(2, (8, 5), 3, 1.4, 30.0, (), 0), Architecture(3, (9,), 2, 1.4, 30.0, (4,), 1, 30.0, 2.0)])
def test_grid_decoder_equals_pointwise_decoder(arch):
    from pillow_nif.model import evaluate_folded_grid

    net = fold(trained_like(arch), COLOUR_IDENTITY, 255.0)
    ys = ((2 * torch.arange(7) + 1) / 7 - 1).float()
    xs = ((2 * torch.arange(12) + 1) / 12 - 1).float()
    assert torch.allclose(evaluate_folded_grid(net, ys, xs), evaluate_folded(net, pixel_grid(12, 7)), atol=2e-3)
