"""Batch encoding (pillow_nif.batch): like images fitted together, each file as encode would write it."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import JOLTS, Jolted, photo

import pillow_nif
from pillow_nif import bitstream, fit
from pillow_nif.batch import BatchFitter, StackedNIF, encode_batch, encode_many
from pillow_nif.fit import EFFORTS, FitConfig, Fitter, encode_image
from pillow_nif.model import NIF
from pillow_nif.render import decode_array

BPP = 4.0
META = [{"exif": b"Exif\x00\x00A"}, {}, {}]  # per-image metadata: only the first image has some


def psnr(data, im):
    ref = np.asarray(im).astype(np.float64)
    mse = np.mean((decode_array(data, device="cpu").astype(np.float64).reshape(ref.shape) - ref) ** 2)
    return 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def images():
    """Two 32x24 images (one group) and a 28x30 one (a group of its own)."""
    return [photo(32, 24), photo(32, 24).transpose(0), photo(28, 30)]


@pytest.fixture(scope="module")
def batch(images):
    """encode_batch's results, and what its progress and on_result callbacks saw."""
    seen = []
    results = encode_batch(images, bpp=BPP, effort=1, seed=3, metadata=META,
                           on_result=lambda i, r: seen.append(i), progress=lambda d, t: seen.append((d, t)))
    return results, seen


def test_files_decode_within_budget_like_encode(images, batch):
    for im, r, meta in zip(images, batch[0], META):
        single = encode_image(im, bpp=BPP, effort=1, seed=3, **meta)
        f = bitstream.loads(r.data)
        assert f.header == bitstream.loads(single.data).header  # same size, mode, colour, architecture
        assert f.metadata == meta
        assert len(r.data) * 8 <= BPP * im.width * im.height and r.bpp == len(r.data) * 8 / (im.width * im.height)
        assert pillow_nif.decode(r.data).size == im.size
        # The same recipe from the same seed: close to one-at-a-time (bit-identical is not promised).
        assert abs(psnr(r.data, im) - single.psnr) <= 1.0
        assert abs(r.psnr - psnr(r.data, im)) < 1e-9


def test_deterministic_for_a_seed(images, batch):
    data = [r.data for r in batch[0]]
    assert encode_many(images, bpp=BPP, effort=1, seed=3, metadata=META) == data
    assert encode_many(images[:1], bpp=BPP, effort=1, seed=4) != data[:1]


def test_callbacks(batch):
    _, seen = batch
    progress = [x for x in seen if isinstance(x, tuple)]
    assert progress[-1][0] == progress[-1][1]  # the bar reaches its total
    assert [x for x in seen if not isinstance(x, tuple)] == [0, 1, 2]  # groups in order of first image


def test_options_checked_before_any_work(images):
    calls = []
    for bad in (dict(bpp=-1), dict(effort=0), dict(seed=1.5), dict(device="tpu"), dict(colour="lab")):
        with pytest.raises(ValueError):
            encode_many(images, progress=lambda d, t: calls.append(d), **{"bpp": BPP, "effort": 1, **bad})
    with pytest.raises(ValueError, match="bpp"):  # the last image cannot meet its budget: nothing is fitted
        encode_many([photo(32, 24), photo(4, 4)], bpp=1, effort=1, progress=lambda d, t: calls.append(d))
    with pytest.raises(OSError):  # a mode NIF cannot store
        encode_many([photo(32, 24), photo(8, 8).convert("CMYK")], bpp=BPP, progress=lambda d, t: calls.append(d))
    assert not calls
    assert encode_many([], bpp=BPP) == []


def arch_with_modulation():
    return bitstream.Architecture(3, (20, 10, 6), 3, 1.4, 45.0, (8, 4), 2, 45.0, 10.0)


def test_stacked_forward_is_each_network():
    nets = [NIF(arch_with_modulation()).initialize(torch.Generator().manual_seed(s)) for s in range(3)]
    stacked = StackedNIF(nets)
    ys, xs = torch.linspace(-1, 1, 7), torch.linspace(-0.9, 0.8, 5)
    out = stacked(ys, xs).reshape(7, 5, 3, 3)
    for i, net in enumerate(nets):
        torch.testing.assert_close(out[:, :, i], net.forward_grid(ys, xs), rtol=1e-5, atol=1e-5)
        for (_, a), (_, b) in zip(stacked.unstack(i).named_tensors(), net.named_tensors()):
            assert torch.equal(a, b)


def test_stacked_forward_on_drawn_pixels_is_each_network():
    """Each image's own rows (B, R), and each row's own columns (B, R, K), as the stack's drawn steps use them."""
    nets = [NIF(arch_with_modulation()).initialize(torch.Generator().manual_seed(s)) for s in range(3)]
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.rand(3, 4, generator=g) * 2 - 1, torch.rand(3, 4, 5, generator=g) * 2 - 1
    every = torch.linspace(-0.95, 0.95, 20)  # or every column's coordinate, and each pixel's column by index
    cols = torch.randint(20, (3, 4, 5), generator=g)
    for out, x in ((StackedNIF(nets)(ys, xs), xs), (StackedNIF(nets)(ys, every, cols=cols), every[cols])):
        out = out.reshape(4, 5, 3, 3)
        for i, net in enumerate(nets):
            for r in range(4):
                torch.testing.assert_close(out[r, :, i], net.forward_grid(ys[i, r : r + 1], x[i, r])[0],
                                           rtol=1e-5, atol=1e-5)


def drawn_stack():
    """A stack of two 96x80 images at 1k pixels a step (stride 3), where steps draw their pixels."""
    rng = np.random.default_rng(0)
    targets = [rng.uniform(-1, 1, (80, 96, 3)).astype(np.float32) for _ in range(2)]
    eff = dataclasses.replace(EFFORTS[1], batch=1 << 10)
    return BatchFitter(targets, arch_with_modulation(), "cpu", eff, FitConfig(), 0), targets, eff


def test_each_image_of_a_stack_draws_by_its_own_error():
    f, targets, eff = drawn_stack()
    assert f.stride == 3
    alone = Fitter(targets[0], f.model.arch, "cpu", eff, FitConfig(), 0)  # encode_image's fit of image 0
    # Image 0's error sits in the left half, image 1's in the right: each draws its columns there.
    f.sampler.err[0, :, 48:] = 1e-6
    f.sampler.err[1, :, :48] = 1e-6
    alone.sampler.err.copy_(f.sampler.err[0])
    rows, cols = f.sample(drawn=True, left=1)
    assert rows.shape == (2, 27) and cols.shape == (2, 27, 32) and f.weights.shape == (2, 27, 32)
    # Half of each weight is uniform (FitConfig.importance 0.5): ~3/4 of the draws fall in the half with the error.
    assert float((cols[0] < 48).float().mean()) > 2 / 3 and float((cols[1] >= 48).float().mean()) > 2 / 3
    # Image 0 drew what its own fit draws from the same map, from the same random numbers, and the generator
    # is where that fit's is: the restarts' noise that follows is encode_image's.
    rows0, cols0 = alone.sample(drawn=True, left=1)
    assert torch.equal(rows[0], rows0) and torch.equal(cols[0], cols0) and torch.equal(f.weights[0], alone.weights)
    assert torch.equal(f.gen.get_state(), alone.gen.get_state())


def test_a_stack_steps_loss_on_drawn_pixels_is_each_images_own():
    f, targets, _ = drawn_stack()
    rows, cols = f.sample(drawn=True, left=1)
    seen = f.sampler.err.clone()
    loss = f.loss(rows, cols)
    ys, xs = f.axes(rows, cols)
    expected, nets = 0.0, [f.model.unstack(i) for i in range(2)]
    for i, net in enumerate(nets):  # Fitter.loss of image i alone: its pixels' log-cosh losses weighted by 1 / chance
        t = torch.from_numpy(targets[i])
        pred = torch.cat([net.forward_grid(ys[i, r : r + 1], xs[i, r]) for r in range(len(ys[i]))])
        terms = fit.log_cosh_terms(pred - t[rows[i][:, None], cols[i]])
        expected = expected + (terms * f.weights[i][..., None]).mean()
        # Its map now holds those losses at its own drawn pixels, and no others.
        err, drawn = f.sampler.err[i], torch.zeros(80, 96, dtype=torch.bool)
        drawn[rows[i][:, None], cols[i]] = True
        torch.testing.assert_close(err[rows[i][:, None], cols[i]], terms.sum(2).detach(), rtol=1e-4, atol=1e-6)
        assert torch.equal(err[~drawn], seen[i][~drawn])
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(f.image_losses(loss).sum(), expected.detach(), rtol=1e-4, atol=1e-6)
    loss.backward()  # and so are its gradients: each image's are its own network's
    expected.backward()
    for i, net in enumerate(nets):
        for (name, stacked), (_, own) in zip(f.model.named_tensors(), net.named_tensors()):
            torch.testing.assert_close(stacked.grad[i], own.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_low_efforts_measure_their_whole_image_mses_on_a_strided_grid(monkeypatch):
    """Efforts 1-4 measure the stages, the tuning and the rounding loss on every s-th row and column of an image of
    s^2 x 64k pixels or more (Effort.mse_pixels; 768x512: every 2nd), a stack each image as its own fit does."""
    assert [fit.mse_stride(512, 768, EFFORTS[e]) for e in range(1, 10)] == [2] * 4 + [1] * 5
    assert fit.mse_stride(256, 256, EFFORTS[1]) == 1 and fit.mse_stride(768, 768, EFFORTS[1]) == 3
    f, targets, eff = drawn_stack()
    eff = dataclasses.replace(eff, mse_pixels=96 * 80 // 9)
    f.mse_stride = fit.mse_stride(80, 96, eff)
    assert f.mse_stride == 3
    for i, m in enumerate(f.mse()):  # 27 x 32 pixels of each image, against its own network alone
        net, t = f.model.unstack(i), torch.from_numpy(targets[i])
        alone = Fitter(targets[i], net.arch, "cpu", eff, FitConfig(), 0)
        alone.model = net
        assert alone.mse_stride == 3 and alone.mse() == pytest.approx(m, rel=1e-5)
        assert m == pytest.approx(fit.image_mse(net, t, stride=3), rel=1e-5)
        assert m != pytest.approx(fit.image_mse(net, t), rel=1e-3)
    strides = []
    loss = fit.rounding_loss
    monkeypatch.setattr(fit, "rounding_loss", lambda *a: strides.append(a[-1]) or loss(*a))
    monkeypatch.setitem(EFFORTS, 1, dataclasses.replace(EFFORTS[1], mse_pixels=40 * 32 // 4))
    im = photo(40, 32)
    encode_image(im, bpp=2.0, effort=1)
    encode_many([im, im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], bpp=2.0, effort=1)
    assert strides == [2] * 3


def test_a_worse_stage_sends_only_that_image_back():
    targets = [np.zeros((8, 8, 3)), np.zeros((8, 8, 3))]
    f = BatchFitter(targets, arch_with_modulation(), "cpu", EFFORTS[1], FitConfig(), 0)
    best = f._keep_best(np.array([1.0, 1.0]), None)
    before = [t.detach().clone() for _, t in f.model.named_tensors()]
    with torch.no_grad():
        for _, t in f.model.named_tensors():
            t.add_(1.0)
    best = f._keep_best(np.array([2.0, 0.5]), best)  # image 0 got worse, image 1 better
    assert list(best[0]) == [1.0, 0.5]
    for (_, t), b in zip(f.model.named_tensors(), before):
        assert torch.equal(t[0], b[0]) and torch.equal(t[1], b[1] + 1.0)


def test_gradient_clipping_is_per_image():
    # One image's large gradient must not shrink another's step: each image is clipped as it would be alone.
    cfg = FitConfig(grad_clip=0.5)
    f = BatchFitter([np.zeros((8, 8, 3))] * 2, arch_with_modulation(), "cpu", EFFORTS[1], cfg, 0)
    gen = torch.Generator().manual_seed(1)
    for p in f.model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
        p.grad[1] *= 1e-3  # image 1: a norm well under the clip
    alone = [torch.nn.Parameter(p.detach()[0].clone()) for p in f.model.parameters()]
    for a, p in zip(alone, f.model.parameters()):
        a.grad = p.grad[0].clone()
    torch.nn.utils.clip_grad_norm_(alone, 0.5)  # what fit.Fitter does for one image
    alone = [a.grad for a in alone]
    small = [p.grad[1].clone() for p in f.model.parameters()]
    f.clip_gradients()
    for p, a, s in zip(f.model.parameters(), alone, small):
        torch.testing.assert_close(p.grad[0], a)
        assert torch.equal(p.grad[1], s)


@pytest.mark.parametrize("jolt", sorted(JOLTS))
def test_a_blown_up_image_goes_back_alone(jolt):
    # fit.CollapseGuard per image: image 1 blows up half-way through the stage and goes back to its best
    # weights; image 0 trains exactly as it would have without image 1's trouble.
    from pillow_nif.colour import to_network_space
    from pillow_nif.imaging import prepare_image

    targets = [to_network_space(prepare_image(photo(32, 32).rotate(90 * k))[0], bitstream.COLOUR_IDENTITY)
               for k in range(2)]

    def stage(jolt_at):
        cls = type("JoltedBatch", (Jolted, BatchFitter), dict(jolt_at=jolt_at, jolt=staticmethod(JOLTS[jolt]),
                                                             rows=slice(1, 2)))
        f = cls(targets, arch_with_modulation(), "cpu", EFFORTS[1], FitConfig(), 0)
        f.run_stage(400, 3e-3, lambda n: None)
        return f

    clean, jolted = stage(None), stage(300)
    for (_, a), (_, b) in zip(clean.model.named_tensors(), jolted.model.named_tensors()):
        assert torch.equal(a[0], b[0])
    assert np.isfinite(jolted.mse()[1]) and jolted.mse()[1] < 1.5 * clean.mse()[1]


def test_an_image_whose_tuned_weights_overflow_is_tuned_again_alone(images, batch, monkeypatch):
    """As encode_image (fit.tune_and_code): an image of the group whose tuned file would exceed its budget is
    quantised for a smaller budget and tuned again, by itself; the others keep their files."""
    from pillow_nif import fit

    real, calls = fit.tuned_file, []

    def overflows(model, plan, codings):  # image 0's first two tuned files
        data = real(model, plan, codings)
        calls.append(plan.header.width)
        return data + bytes(plan.budget - len(data) + 1) if len(calls) <= 2 else data  # a byte over

    monkeypatch.setattr(fit, "tuned_file", overflows)
    results = encode_batch(images, bpp=BPP, effort=1, seed=3, metadata=META)
    assert len(calls) == 5  # image 0: the group's tuned file, the same alone, then tuned again; images 1 and 2
    assert len(results[0].data) * 8 <= BPP * 32 * 24 - 8 * (1 + 4)  # the overflow and a word to spare
    for im, r, before in zip(images, results, batch[0]):
        assert len(r.data) * 8 <= BPP * im.width * im.height and pillow_nif.decode(r.data).size == im.size
        assert abs(r.psnr - before.psnr) <= 1.0
    assert [r.data for r in results[1:]] == [r.data for r in batch[0][1:]]


def test_encoding_and_decoding_leave_the_callers_random_streams_alone(images):
    """Every draw of a fit comes from its own seeded generator: a script that saves an image mid-way through its
    own seeded work (a training loop, a simulation) must get the same random numbers after it as without it."""
    torch.manual_seed(123)
    np.random.seed(123)
    state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    data = encode_image(images[0], bpp=BPP, effort=1).data
    pillow_nif.decode(data)
    encode_many(images[:2], bpp=BPP, effort=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert np.array_equal(np.random.get_state()[1], np_state)


def test_a_stack_holds_at_most_cudas_grid_limit_of_networks():
    """The fused layer puts the stack on its grid's z axis, which CUDA caps at 65535: 70000 8x8 images of one
    network had made one stack, and its launch would fail."""
    import types

    from pillow_nif import batch

    arch = bitstream.Architecture(0, (4,), 3, 1.4, 30.0)
    jobs = [types.SimpleNamespace(header=types.SimpleNamespace(arch=arch, height=8, width=8), eff=EFFORTS[1])] * 70000
    groups = batch._groups(jobs, "cuda")
    assert max(map(len, groups)) <= batch.MAX_GROUP and sum(map(len, groups)) == 70000
