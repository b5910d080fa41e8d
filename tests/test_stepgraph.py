"""The fitting step as CUDA graphs replay it (stepgraph.py): its buffers, order and fallbacks, uncaptured on the CPU
against the eager loop; captured against uncaptured where there is a GPU."""

import contextlib
import math
import types
import warnings

import numpy as np
import pytest
import torch
from conftest import JOLTS, Jolted, photo

from pillow_nif import bitstream, fit
from pillow_nif.batch import BatchFitter
from pillow_nif.colour import to_network_space
from pillow_nif.fit import FitConfig, choose_architecture, encode_image
from pillow_nif.imaging import prepare_image
from pillow_nif.optim import group_rate
from pillow_nif.stepgraph import StepGraph


def _target(w, h, shift=0):
    """The test photo in network units; `shift` rolls it sideways (another image of the same size)."""
    return np.roll(to_network_space(prepare_image(photo(w, h))[0], bitstream.COLOUR_IDENTITY), 17 * shift, axis=1)


def _stage(target, budget, graph: bool | None, steps=60, device="cpu", cls=fit.Fitter):
    cfg = FitConfig(step_graph=graph)
    h, w = target.shape[:2] if not isinstance(target, list) else target[0].shape[:2]
    arch = choose_architecture(w, h, 3, budget, cfg)
    f = cls(target, arch, device, fit.EFFORTS[1], cfg, 0)
    f.run_stage(steps, f.lr, lambda n: None)
    return f


def _weights(f):
    return [t.detach().clone() for _, t in f.model.named_tensors()]


def _close(a, b, rtol):
    """Relative distance (Frobenius) of weights after the same steps with the rate on the device against the loop's
    Python float: the updates round apart and the fits drift, by 1.3e-3 (modulated) and 1.2e-6 (plain) after the
    60 drawn steps of test_drawn_steps_train_as_the_eager_loop. A stale draw or rate put them 0.47 to 23 apart."""
    for x, y in zip(a, b):
        err = float((x - y).norm() / y.norm().clamp(min=1e-6))
        assert err < rtol, err


def _same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


class _RateOnDevice(fit.Fitter):
    """Uncaptured steps that read the rate from a tensor, as captured ones do."""

    def step_graph(self, opt, weights_fn=None):
        return StepGraph(self, opt, capture=False, device_rate=True, weights_fn=weights_fn)


@pytest.mark.parametrize("budget", [600, 8000])  # plain (AdamW), modulated (Muon + AdamW)
def test_drawn_steps_train_as_the_eager_loop(budget):
    target = _target(128, 96)  # stride 2 at effort 1: every step drawn by the importance sampler
    eager, graphed = _stage(target, budget, False), _stage(target, budget, True)
    assert eager.sampler is not None and eager.stride == 2
    _same(_weights(graphed), _weights(eager))
    _same([graphed.sampler.err], [eager.sampler.err])  # the error map is written inside the graph's body
    _close(_weights(_stage(target, budget, True, cls=_RateOnDevice)), _weights(eager), 1e-2)


def test_whole_image_steps_train_as_the_eager_loop():
    target = _target(48, 40)  # under effort 1's 4k pixels: every step is the whole image, no sampler
    eager, graphed = _stage(target, 8000, False), _stage(target, 8000, True)
    assert eager.stride == 1 and eager.sampler is None
    _same(_weights(graphed), _weights(eager))


def test_a_strided_grid_without_a_sampler_stays_eager():
    # A random phase gives some steps one row fewer: no fixed shapes, so no graph.
    cfg = FitConfig(step_graph=True, importance=0.0)
    f = fit.Fitter(np.zeros((97, 83, 3)), choose_architecture(83, 97, 3, 600, cfg), "cpu", fit.EFFORTS[1], cfg, 0)
    assert f.stride == 2 and f.step_graph(f.optimizer(1e-3, 0.0, False)) is None


def test_a_stack_of_images_trains_as_the_eager_loop():
    targets = [_target(128, 96, s) for s in range(3)]
    eager = _stage(targets, 8000, False, cls=BatchFitter)
    graphed = _stage(targets, 8000, True, cls=BatchFitter)
    _same(_weights(graphed), _weights(eager))


def test_each_step_sees_its_own_draw_and_rate(monkeypatch):
    # The buffers are filled before every step: a body that kept the first draw or rate would fit other pixels.
    seen, scaled = [], []
    forward_backward = StepGraph._forward_backward

    def spy(self):
        seen.append((self.draw[0].clone(), float(self.opt.param_groups[0]["lr"])))
        scaled.append({float(group_rate(g)) / g.get("lr_scale", 1.0) for g in self.opt.param_groups})
        forward_backward(self)

    monkeypatch.setattr(StepGraph, "_forward_backward", spy)
    f = _stage(_target(128, 96), 8000, True, steps=20, cls=_RateOnDevice)
    rows = [r for r, _ in seen]
    assert len(seen) == 20 and any(not torch.equal(rows[0], r) for r in rows[1:])
    rates = [lr for _, lr in seen]  # warm-up, hold, decay: read from the device at each step
    assert rates[0] < rates[1] == pytest.approx(f.lr) and rates[-1] < rates[-2] < rates[1]
    # The period's offset has a rate of its own (FitConfig.period_lr), lr_scale x everyone else's at every step.
    assert any("lr_scale" in g for g in f.optimizer(1.0, 0.0, False).param_groups)
    assert all(len(s) == 1 or max(s) - min(s) <= 1e-6 * max(s) for s in scaled)


def test_losses_handed_to_the_guard_outlive_the_next_step():
    # The guard sums a window of losses; the graph rewrites its loss buffer at every replay.
    f = _stage(_target(128, 96), 8000, None, steps=0)
    opt = f.optimizer(f.lr, 0.0, False)
    g = StepGraph(f, opt, capture=False)
    first = g.gradients(1e-3, 10)
    kept = first.clone()
    g.update()
    second = g.gradients(1e-3, 9)
    assert torch.equal(first, kept) and not torch.equal(first, second)


@pytest.mark.parametrize("jolt", sorted(JOLTS))
def test_a_blown_up_graphed_stage_goes_back_to_its_best_weights(jolt):
    # The guard restores weights, moments and gradients in place between the graphs' two halves.
    target = _target(32, 32)
    arch = choose_architecture(32, 32, 3, 1500, FitConfig())

    def stage(jolt_at):
        cfg = FitConfig(step_graph=True)
        cls = type("JoltedFitter", (Jolted, fit.Fitter), dict(jolt_at=jolt_at, jolt=staticmethod(JOLTS[jolt])))
        f = cls(target, arch, "cpu", fit.EFFORTS[1], cfg, 0)
        assert f.step_graph(f.optimizer(1e-3, 0.0, False)) is not None
        f.run_stage(400, 3e-3, lambda n: None)
        return f.mse()

    clean, jolted = stage(None), stage(300)
    assert math.isfinite(jolted) and jolted < 1.5 * clean


def test_a_capture_that_fails_warns_and_fits_on_uncaptured(monkeypatch):
    # This CPU build has no CUDA graphs, so the capture fails as one with a host sync inside would on a GPU.
    monkeypatch.setattr(StepGraph, "_warm_stream", lambda self: contextlib.nullcontext())
    target = _target(128, 96)
    want = _weights(_stage(target, 8000, True, cls=_RateOnDevice))
    real_init = StepGraph.__init__

    def captured(self, fitter, opt, capture, weights_fn=None):
        real_init(self, fitter, opt, True, weights_fn=weights_fn)

    monkeypatch.setattr(StepGraph, "__init__", captured)
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        got = _weights(_stage(target, 8000, True))
    _same(got, want)


def test_an_encode_through_uncaptured_graph_steps_is_the_eager_encode():
    im = photo(96, 64)
    eager = encode_image(im, bpp=1.0, effort=1, device="cpu", config=FitConfig(step_graph=False))
    graphed = encode_image(im, bpp=1.0, effort=1, device="cpu", config=FitConfig(step_graph=True))
    assert graphed.data == eager.data


# Operations a CUDA graph's capture refuses or silently freezes: reading a value on the host (a sync), and making a
# tensor from Python data (a copy from host memory).
_HOST = {"aten._local_scalar_dense", "aten.lift_fresh", "aten.nonzero", "aten.masked_select", "aten._unique2",
         "aten.unique_consecutive", "aten.is_nonzero", "aten.equal"}


@pytest.mark.parametrize("kind", ["fit", "stack", "tuning"])
def test_a_captured_body_neither_reads_the_device_nor_copies_from_the_host(kind):
    # What capture on a GPU would reject, seen on the CPU: every operation of the bodies after the warm steps.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    class Recorded(StepGraph):
        def _forward_backward(self):
            with Record() if self.steps >= self.WARM else contextlib.nullcontext():
                super()._forward_backward()

        def update(self):
            with Record() if self.steps >= self.WARM else contextlib.nullcontext():
                super().update()

    seen = set()
    cls = BatchFitter if kind == "stack" else fit.Fitter
    fitter_cls = type("RecordedFitter", (cls,), dict(
        step_graph=lambda self, opt, weights_fn=None: Recorded(self, opt, capture=False, device_rate=True,
                                                                weights_fn=weights_fn)))
    targets = [_target(128, 96), _target(128, 96, 1)] if kind == "stack" else _target(128, 96)
    f = _stage(targets, 8000, True, steps=0 if kind == "tuning" else 6, cls=fitter_cls)
    if kind == "tuning":
        codings = [types.SimpleNamespace(step=1e-3, qmax=1000) for _ in f.model.named_tensors()]
        f.run_stage(6, 1e-5, lambda n: None, lambda: fit.fake_quantized(f.model, codings))
    assert "aten.mm" in seen or "aten.bmm" in seen  # the bodies ran under the recorder
    assert not seen & _HOST, seen & _HOST


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["fit", "stack", "tuning"])
def test_the_captured_step_replays_the_uncaptured_one_on_cuda(kind):
    target = _target(256, 192)
    targets, cls = ([target, _target(256, 192, 1)], BatchFitter) if kind == "stack" else (target, fit.Fitter)
    held = []
    capture = StepGraph._capture

    def spy(self):
        capture(self)
        held.append(self.graphs is not None)

    def run(cls):
        f = _stage(targets, 8000, None, steps=0 if kind == "tuning" else 80, device="cuda", cls=cls)
        if kind == "tuning":  # a straight-through quantiser in the body, as fit._quantisation_aware_tuning's
            codings = [types.SimpleNamespace(step=max(float(t.abs().max()), 1e-2) / 60, qmax=63)
                       for _, t in f.model.named_tensors()]
            f.run_stage(80, 1e-3, lambda n: None, lambda: fit.fake_quantized(f.model, codings))
        return f

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as m:
        warnings.simplefilter("error", RuntimeWarning)  # a capture that fell back is a failure here
        m.setattr(StepGraph, "_capture", spy)
        captured = run(cls)
    assert held == [True]
    # The same kernels launched one by one: the replays compute what they would, up to cuBLAS's choice of
    # algorithm inside a capture, whose rounding the fit then carries on (a stale buffer is 0.47-23 apart).
    eager = run(type("RateOnDevice", (cls,), dict(step_graph=_RateOnDevice.step_graph)))
    _close(_weights(captured), _weights(eager), 1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_capture_leaves_other_threads_decoding():
    # A thread that decodes (and so copies pixels to the host) while another captures its steps must not fail.
    import threading

    import pillow_nif

    data = pillow_nif.encode(photo(64, 48), bpp=2.0, effort=1, device="cpu")
    errors, done = [], threading.Event()

    def decode():
        while not done.is_set():
            try:
                pillow_nif.decode(data, device="cuda")
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                return

    worker = threading.Thread(target=decode)
    worker.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for _ in range(3):  # three captures
                _stage(_target(256, 192), 8000, None, steps=20, device="cuda")
    finally:
        done.set()
        worker.join()
    assert not errors
