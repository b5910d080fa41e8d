"""Importance sampling of a fitting step's pixels (sampling.ImportanceSampler) and its use by fit.Fitter."""

import dataclasses

import numpy as np
import pytest
import torch

from pillow_nif import fit
from pillow_nif.sampling import ImportanceSampler

H, W = 40, 56


def sampler(share=0.5, power=0.5, seed=0, rows=10, cols=14, refresh=16):
    return ImportanceSampler(H, W, rows, cols, share, power, "cpu", torch.Generator().manual_seed(seed), refresh)


def hot_map():
    """Losses 100x larger in one corner (a tenth of the image) than elsewhere."""
    err = torch.full((H, W), 0.01)
    err[:12, :19] = 1.0
    return err


def test_draws_have_the_steps_shape_and_stay_in_the_image():
    s = sampler()
    s.err = hot_map()
    for _ in range(50):
        rows, cols, weights = s.draw()
        assert rows.shape == (10,) and cols.shape == weights.shape == (10, 14)
        assert 0 <= int(rows.min()) and int(rows.max()) < H
        assert 0 <= int(cols.min()) and int(cols.max()) < W
        assert torch.all(weights > 0)
        assert torch.all(rows[1:] >= rows[:-1]) and torch.all(cols[:, 1:] >= cols[:, :-1])  # systematic: in order


def test_the_weighted_loss_is_an_unbiased_estimate_of_the_image_mean():
    """What the fit minimises must stay the whole image's loss: weight x loss averaged over draws -> the mean."""
    s = sampler()
    s.err = loss = hot_map() * torch.rand(H, W, generator=torch.Generator().manual_seed(1))
    est = []
    for _ in range(4000):
        rows, cols, weights = s.draw()
        est.append(float((weights * loss[rows[:, None], cols]).mean()))
    assert np.mean(est) == pytest.approx(float(loss.mean()), rel=0.01)


def test_pixels_with_larger_losses_are_drawn_more_and_every_pixel_can_be_drawn():
    s = sampler()
    s.err = hot_map()
    counts = torch.zeros(H, W)
    for _ in range(3000):
        rows, cols, _ = s.draw()
        counts.index_put_((rows[:, None].expand_as(cols), cols), torch.ones(cols.shape), accumulate=True)
    hot = float(counts[:12, :19].sum() / counts.sum())
    # sqrt(100) = 10x the weight: 0.5 * 10 / (0.1 * 10 + 0.9) of the importance share plus 0.05 of the uniform one
    assert hot == pytest.approx(0.5 * 0.1 * 10 / (0.1 * 10 + 0.9) + 0.5 * 0.1, rel=0.05)
    assert int((counts == 0).sum()) == 0  # the uniform share reaches every pixel


def test_draws_follow_the_seed():
    a, b, c = sampler(seed=3), sampler(seed=3), sampler(seed=4)
    for s in (a, b, c):
        s.err = hot_map()
    da, db, dc = a.draw(), b.draw(), c.draw()
    assert all(torch.equal(x, y) for x, y in zip(da, db))
    assert not torch.equal(da[1], dc[1])


def test_draws_made_ahead_are_the_draws_made_one_by_one():
    """The sampler draws up to its next refresh at once; the draws, and what is left of the generator after a
    stage's `limit`, must be those of one draw at a time (a file must not depend on how the draws were batched)."""
    ahead, single = sampler(seed=5, refresh=16), sampler(seed=5, refresh=16)
    reference = torch.Generator().manual_seed(5)
    for s in (ahead, single):
        s.err = hot_map()
    for stage in (21, 30):  # stages that end between refreshes
        for left in range(stage, 0, -1):
            a, b = ahead.draw(left), single.draw(1)
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        # Each draw takes one random number for its rows and one per row for their columns, no more.
        torch.rand(stage * (1 + 10), generator=reference, dtype=torch.float64)
        after = torch.rand(3, generator=reference)
        assert torch.equal(torch.rand(3, generator=ahead.gen), after)
        assert torch.equal(torch.rand(3, generator=single.gen), after)
        ahead.err = hot_map() * torch.rand(H, W, generator=torch.Generator().manual_seed(stage))
        single.err = ahead.err.clone()  # a new map, weighed at the next refresh


def test_observed_losses_steer_the_draws_from_the_next_refresh():
    s = sampler(share=1.0, power=1.0, refresh=2)
    rows, cols, weights = s.draw()
    assert torch.equal(s.err, torch.ones(H, W)) and torch.all(weights == 1)  # nothing measured yet: uniform
    s.observe(torch.tensor([5 * W + 7, 5 * W + 8]), torch.tensor([[5000.0, -1e-8]]))  # flat indices
    assert float(s.err[5, 7]) == 5000.0 and float(s.err[5, 8]) == 0.0  # rounding below zero clamps
    rows, cols, weights = s.draw()  # still the map it weighed first, and its weights
    assert torch.all(weights == 1)
    rows, cols, weights = s.draw()
    hit = (rows[:, None] == 5) & (cols == 7)
    assert int(hit.sum()) >= 1  # over 1/10 of the total: drawn for sure
    assert torch.all(weights[hit] < 1) and torch.all(weights[~hit] > 1)


def test_fitting_and_tuning_stages_draw_and_importance_0_keeps_the_grid():
    """96x96 at 1k pixels a step (stride 3): fitting and tuning steps draw (NOTES.md #159, #160d); importance 0
    keeps the strided grid."""
    rng = np.random.default_rng(0)
    target = rng.uniform(-1, 1, (96, 96, 3)).astype(np.float32)
    arch = fit.choose_architecture(96, 96, 3, 3000, fit.FitConfig())
    eff = dataclasses.replace(fit.EFFORTS[1], batch=1 << 10)
    f = fit.Fitter(target, arch, "cpu", eff, fit.FitConfig(), 0)
    assert f.stride == 3 and f.sampler is not None
    rows, cols = f.sample(drawn=True, left=1)
    assert isinstance(cols, torch.Tensor) and cols.shape == (32, 32) and f.weights.shape == (32, 32)
    loss = f.loss(rows, cols)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in f.model.parameters())
    # A fitting stage and a tuning stage (weights_fn: the weights the step sees) each take one draw a step and
    # record its losses in the map; `limit` leaves no draw made ahead past a stage's end.
    for weights_fn in (None, lambda: dict(f.model.named_tensors())):
        before, seen = f.sampler.draws, f.sampler.err.clone()
        f.run_stage(5, 1e-5, lambda n: None, weights_fn)
        assert f.sampler.draws == before + 5 and not f.sampler.ahead
        assert not torch.equal(f.sampler.err, seen)
    plain = fit.Fitter(target, arch, "cpu", eff, dataclasses.replace(fit.FitConfig(), importance=0.0), 0)
    assert plain.sampler is None and isinstance(plain.sample(drawn=True)[0], range)
