"""The fitting optimiser (optim.py): Muon on the genesis matrices after the input layer, AdamW on the rest."""

import dataclasses

import numpy as np
import pytest
import torch

from pillow_nif import fit
from pillow_nif.fit import FitConfig, choose_architecture
from pillow_nif.optim import AdamW, Chain, Muon, _Stacks, orthogonalise, orthogonalise_all


@pytest.mark.parametrize("shape", [(18, 70), (70, 32), (3, 25, 99), (2, 1, 16)])
def test_orthogonalise_flattens_the_spectrum_of_every_matrix_of_a_stack(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g[..., 0, :] *= 100  # one dominant direction, as a gradient has: the update must not be dominated by it
    o = orthogonalise(g)
    assert o.shape == g.shape
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.5
    if g.dim() == 3:  # each matrix of the stack as if alone
        for i in range(g.shape[0]):
            torch.testing.assert_close(o[i], orthogonalise(g[i]), rtol=1e-5, atol=1e-6)


def test_orthogonalising_several_shapes_at_once_gives_each_its_own_update():
    """Muon pads a layer's matrices into one stack: each must come out as if orthogonalised alone."""
    gen = torch.Generator().manual_seed(3)
    gs = [torch.randn(*s, generator=gen) for s in [(28, 61), (15, 28), (15, 15), (3, 15), (40, 9), (2, 7, 5)]]
    for g, o in zip(gs, orthogonalise_all(gs)):
        assert o.shape == g.shape
        torch.testing.assert_close(o, orthogonalise(g), rtol=1e-4, atol=1e-5)


def test_stacks_are_split_where_padding_would_cost_more_than_the_calls_it_saves():
    """The genesis matrices of a 768x512 image at 1.0 bpp padded to the largest took 2.4x the time of a split
    (NOTES.md #132); a 256x256 crop's small ones stay in one stack, in their given order (the same bits as before)."""
    gen = torch.Generator().manual_seed(4)
    full = [torch.randn(*s, generator=gen) for s in [(290, 58), (130, 290), (72, 130), (72, 72), (3, 72)]]
    crop = [torch.randn(*s, generator=gen) for s in [(62, 46), (28, 62), (15, 28), (15, 15), (3, 15)]]
    split = _Stacks(full)
    assert [1] in split.groups and len(split.groups) >= 3  # the largest alone
    assert sorted(i for g in split.groups for i in g) == list(range(5))
    assert _Stacks(crop).groups == [[0, 1, 2, 3, 4]]
    for g, o in zip(full, split.orthogonalise(full)):
        assert o.shape == g.shape
        torch.testing.assert_close(o, orthogonalise(g), rtol=1e-4, atol=1e-5)


def _run(opt_params, grads, make):
    opt = make(opt_params)
    for g in grads:
        for p, gp in zip(opt_params, g):
            p.grad = gp.clone()
        opt.step()
    return [p.detach() for p in opt_params]


def test_muon_follows_torch_muon_and_gives_each_stacked_matrix_its_own_update():
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(2, 24, 40, generator=gen) * 0.1
    grads = [torch.randn(2, 24, 40, generator=gen) * 10 ** -k for k in range(1, 5)]  # shrinking, as when converging
    kw = dict(lr=3e-3, weight_decay=0.01)
    stacked = _run([torch.nn.Parameter(w0.clone())], [[g] for g in grads], lambda ps: Muon(ps, **kw))[0]
    for i in range(2):
        alone = _run([torch.nn.Parameter(w0[i].clone())], [[g[i]] for g in grads], lambda ps: Muon(ps, **kw))[0]
        torch.testing.assert_close(stacked[i], alone, rtol=1e-5, atol=1e-7)
        # torch's own Muon (2-D only, orthogonalising in bfloat16): the same update up to its rounding
        ref = _run([torch.nn.Parameter(w0[i].clone())], [[g[i]] for g in grads],
                   lambda ps: torch.optim.Muon(ps, adjust_lr_fn="match_rms_adamw", **kw))[0]
        moved = (ref - w0[i]).norm()
        assert moved > 0 and (alone - ref).norm() < 0.05 * moved


def test_muon_steps_matrices_of_several_shapes_as_if_each_were_alone():
    """Muon keeps one zero-padded stack for all its matrices across steps, whatever their groups: the padding and
    the other matrices must stay out of every update, and each group keeps its own decay."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(28, 61), (15, 28), (15, 15), (3, 15), (40, 9)]
    decays = [0.25, 1.0, 1.0, 1.0, 0.0]
    w0 = [torch.randn(*s, generator=gen) * 0.1 for s in shapes]
    grads = [[torch.randn(*s, generator=gen) * 10 ** -k for s in shapes] for k in range(1, 5)]
    groups = lambda ps: [{"params": ps[:1], "weight_decay": 0.25}, {"params": ps[1:4]},  # noqa: E731
                         {"params": ps[4:], "weight_decay": 0.0}]
    together = _run([torch.nn.Parameter(w.clone()) for w in w0], grads, lambda ps: Muon(groups(ps), lr=3e-3,
                                                                                          weight_decay=1.0))
    for i, w in enumerate(w0):
        alone = _run([torch.nn.Parameter(w.clone())], [[g[i]] for g in grads],
                     lambda ps: Muon(ps, lr=3e-3, weight_decay=decays[i]))
        torch.testing.assert_close(together[i], alone[0], rtol=1e-5, atol=1e-7)


def test_adamw_steps_exactly_as_torchs_fused_adamw():
    """optim.AdamW skips torch's per-step bookkeeping: the same arithmetic, also as the rate changes (each step of a
    stage has its own) and when a parameter has no gradient for a step."""
    gen = torch.Generator().manual_seed(4)
    w0 = [torch.randn(*s, generator=gen) for s in [(20, 9), (20,), (3, 20), (3,)]]
    grads = [[torch.randn(w.shape, generator=gen) * 10 ** -k for w in w0] for k in range(1, 7)]
    grads[3][1] = None

    def run(cls, **kw):
        ps = [torch.nn.Parameter(w.clone()) for w in w0]
        opt = cls([{"params": ps[:2], "weight_decay": 1.0}, {"params": ps[2:], "weight_decay": 1e-4}], lr=1e-3, **kw)
        for i, g in enumerate(grads):
            for p, gp in zip(ps, g):
                p.grad = None if gp is None else gp.clone()
            for group in opt.param_groups:
                group["lr"] = 1e-3 * (i + 1)
            opt.step()
        return [p.detach() for p in ps]

    for ours, torchs in zip(run(AdamW), run(torch.optim.AdamW, fused=True)):
        torch.testing.assert_close(ours, torchs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="amsgrad"):
        AdamW([torch.nn.Parameter(torch.zeros(3))], amsgrad=True)


def test_muon_refuses_vectors():
    with pytest.raises(ValueError, match="matrices"):
        Muon([torch.nn.Parameter(torch.zeros(5))])


def _groups(opt):
    muon = [p for o in opt.optimizers if isinstance(o, Muon) for g in o.param_groups for p in g["params"]]
    adamw = [p for o in opt.optimizers if isinstance(o, AdamW) for g in o.param_groups for p in g["params"]]
    return {id(p) for p in muon}, {id(p) for p in adamw}


def _decays(opt):
    """id of each parameter of a Chain -> the weight decay it trains with."""
    return {id(p): g["weight_decay"] for o in opt.optimizers for g in o.param_groups for p in g["params"]}


def test_fitting_trains_the_genesis_matrices_with_muon_and_tuning_uses_adamw():
    from pillow_nif.batch import BatchFitter

    cfg = FitConfig()
    arch = choose_architecture(64, 64, 3, 8000, cfg)  # modulated, four sine layers
    target = np.zeros((16, 16, 3))
    for f in (fit.Fitter(target, arch, "cpu", fit.EFFORTS[5], cfg, 0),
              BatchFitter([target, target], arch, "cpu", fit.EFFORTS[5], cfg, 0)):
        named = f.model.named_tensors()
        expected = {id(t) for n, t in named if n.startswith("genesis.") and n.endswith(".weight")}
        opt = f.optimizer(1e-3, 1e-4, tuning=False)
        assert isinstance(opt, Chain)
        muon, adamw = _groups(opt)
        # Every weight matrix decays strongly (smaller weights quantise with smaller phase errors): the hidden
        # ones at muon_decay, the input layer's and the modulation's at their own rates; the biases as asked
        decays = _decays(opt)
        assert len(decays) == len(named)
        own = {"genesis.0.weight": cfg.input_decay, "modulation.0.weight": cfg.modulation_decay,
               "modulation.1.weight": cfg.modulation_decay, "modulation.2.weight": cfg.modulation_decay}
        for n, t in named:
            assert decays[id(t)] == own.get(n, 1e-4 if n.endswith(".bias") else cfg.muon_decay), n
        assert muon == expected and len(expected) == len(arch.widths) + 1 == 5
        assert adamw == {id(t) for _, t in named} - expected
        assert isinstance(f.optimizer(1e-3, 0.0, tuning=True), AdamW)
    # short stages (effort 2: 2 x 400 steps) fitted small smooth images erratically with the input and modulation
    # decays (NOTES.md #194): those decay as asked, and the input layer stays on AdamW (Muon there was measured with
    # its decay only); the period's offset has a group of its own, at cfg.period_lr x the rate (NOTES.md #188)
    f = fit.Fitter(target, arch, "cpu", fit.EFFORTS[2], cfg, 0)
    short = f.optimizer(1e-3, 1e-4, tuning=False)
    groups = [g for o in short.optimizers for g in o.param_groups]
    assert [g["weight_decay"] for g in groups] == [cfg.muon_decay, 1e-4, 1e-4]
    assert [g.get("lr_scale") for g in groups] == [None, None, cfg.period_lr]
    assert [id(p) for p in groups[2]["params"]] == [id(f.model.modulation[-1].bias)]
    assert id(f.model.genesis[0].weight) in _groups(short)[1]
    adamw_only = fit.Fitter(target, arch, "cpu", fit.EFFORTS[5], FitConfig(muon=False), 0).optimizer(1e-3, 0.0, False)
    assert isinstance(adamw_only, AdamW)
    # without Muon the hidden matrices train with AdamW at the decay asked for; the input layer keeps its own
    decays = sorted(g["weight_decay"] for g in adamw_only.param_groups)
    assert decays == sorted([0.0, cfg.input_decay, cfg.modulation_decay])
    assert sum(len(g["params"]) for g in adamw_only.param_groups) == len(named)


def test_an_alpha_channels_output_matrix_trains_with_adamw():
    """With an alpha channel (LA, RGBA) the output matrix leaves Muon, whose equal steps along its few singular
    directions had cost cut-outs 0.66 dB at effort 1 (NOTES.md #211); the other matrices stay on Muon."""
    from pillow_nif.batch import BatchFitter

    cfg = FitConfig()
    for channels in (1, 2, 3, 4):
        arch = choose_architecture(64, 64, channels, 8000, cfg)
        target = np.zeros((16, 16, channels))
        for f in (fit.Fitter(target, arch, "cpu", fit.EFFORTS[5], cfg, 0),
                  BatchFitter([target, target], arch, "cpu", fit.EFFORTS[5], cfg, 0)):
            named = dict(f.model.named_tensors())
            opt = f.optimizer(1e-3, 1e-4, tuning=False)
            muon, adamw = _groups(opt)
            output = named[f"genesis.{len(arch.widths)}.weight"]
            assert (id(output) in adamw) == (channels in (2, 4)) and (id(output) in muon) == (channels in (1, 3))
            assert id(named["genesis.1.weight"]) in muon and id(named["genesis.0.weight"]) in muon
            if channels in (2, 4):
                assert _decays(opt)[id(output)] == 1e-4  # the biases' decay, as measured
        plain = fit.Fitter(target, arch, "cpu", fit.EFFORTS[5], FitConfig(alpha_output_adamw=False), 0)
        assert id(dict(plain.model.named_tensors())[f"genesis.{len(arch.widths)}.weight"]) in _groups(
            plain.optimizer(1e-3, 1e-4, tuning=False))[0]


def test_decays_scale_down_where_a_step_samples_less_of_the_image():
    # The decays were measured with steps of 1/16 of a 256x256 image; at full Kodak size they cost up to 1 dB at
    # 1.0 bpp, a quarter of them (a step's share there) did not (NOTES.md #92)
    cfg = FitConfig()
    arch = choose_architecture(768, 512, 3, 20000, cfg)
    assert arch.mod_widths

    def own(h, w):
        f = fit.Fitter(np.zeros((h, w, 3), np.float32), arch, "cpu", fit.EFFORTS[5], cfg, 0)
        opt = f.optimizer(1e-3, 1e-4, tuning=False)
        decays = _decays(opt)
        named = dict(f.model.named_tensors())
        return f.stride, decays[id(named["genesis.0.weight"])], decays[id(named["modulation.0.weight"])]

    assert own(256, 256) == (4, cfg.input_decay, cfg.modulation_decay)
    assert own(64, 64) == (1, cfg.input_decay, cfg.modulation_decay)  # never above the measured decays
    # at full size the rate is cfg.sparse_lr times lower and every decay that much higher (the next test)
    grow = 1 / cfg.sparse_lr
    assert own(512, 768) == pytest.approx((8, grow * cfg.input_decay / 4, grow * cfg.modulation_decay / 4))


def test_sparse_steps_fit_at_a_lower_rate_with_the_same_shrinkage_a_step():
    # 768x512 on the CPU (1/64 of the image a step): lr x 2/3 with every decay x 3/2 beat 3e-3 on 18 of 22 points
    # of 8 images (NOTES.md #152, #152b, #153b), 2e-3 with the decays kept lost to rounding (#151); crops and short
    # stages were tuned as they are
    cfg = FitConfig()
    arch = choose_architecture(768, 512, 3, 20000, cfg)
    assert arch.mod_widths

    def fitter(h, w, effort=fit.EFFORTS[5], arch=arch):
        return fit.Fitter(np.zeros((h, w, 3), np.float32), arch, "cpu", effort, cfg, 0)

    def shrinkage(f):  # tensor name -> lr x decay, at the first stage's rate
        decays = _decays(f.optimizer(f.stage_lr(0), cfg.weight_decay, tuning=False))
        return {n: f.stage_lr(0) * decays[id(t)] for n, t in f.model.named_tensors()}

    full, crop = fitter(512, 768), fitter(256, 256)
    assert full.lr == pytest.approx(cfg.lr * cfg.sparse_lr) and crop.lr == cfg.lr
    assert full.stage_lr(1) == pytest.approx(cfg.lr * cfg.sparse_lr * cfg.restart_lr)
    # each step shrinks every tensor as much as the full rate with the unscaled decays did
    unscaled = fit.Fitter(np.zeros((512, 768, 3), np.float32), arch, "cpu", fit.EFFORTS[5],
                          dataclasses.replace(cfg, sparse_lr=1.0), 0)
    assert unscaled.lr == cfg.lr
    assert shrinkage(full) == pytest.approx(shrinkage(unscaled))
    assert len(set(shrinkage(full).values())) > 2  # biases, Muon's matrices, the input layer and the modulation
    # between the two shares the rate moves monotonically (384x384: 16/36 of a crop's share a step)
    assert cfg.lr * cfg.sparse_lr < fitter(384, 384).lr < cfg.lr
    # short stages (effort 2) and plain networks keep their rates; tuning keeps its own, undecayed
    assert fitter(512, 768, fit.EFFORTS[2]).lr == cfg.lr
    plain = choose_architecture(64, 64, 3, 1500, cfg)
    assert not plain.mod_widths and fitter(512, 768, arch=plain).lr == cfg.plain_lr
    tuning = full.optimizer(cfg.qat_lr, 0.0, tuning=True)
    assert {g["weight_decay"] for g in tuning.param_groups} == {0.0}


def test_sparse_steps_end_with_a_polishing_stage_and_tune_longer():
    # 768x512 (1/64 of the image a step): the large networks were short of converged; a polishing stage at lr / 10
    # after the last one and twice the tuning at 0.7 x its rate gave +0.24 ... +0.29 dB at 1.0 bpp on the same fits
    # with half a stage's steps (NOTES.md #172), +0.34 / +0.42 with a whole stage's (#173) and +0.06 more end to
    # end with a stage and a half (#175, #178), which only the large networks of high rates repay; crops, short
    # stages and plain networks keep the recipe they were tuned with
    cfg = FitConfig()
    small = choose_architecture(768, 512, 3, 20000, cfg)  # ~0.3 bpp: 0.05 parameters a pixel
    large = choose_architecture(768, 512, 3, 85000, cfg)  # ~1.0 bpp: 0.22

    def schedule(h, w, effort=fit.EFFORTS[5], arch=small):
        f = fit.Fitter(np.zeros((h, w, 3), np.float32), arch, "cpu", effort, cfg, 0)
        return f.polish_iters, f.qat_iters, f.qat_lr

    e = fit.EFFORTS[5]
    assert schedule(512, 768) == (e.iters // 2, 2 * e.qat_iters, pytest.approx(0.7 * cfg.qat_lr))
    assert schedule(512, 768, arch=large) == (3 * e.iters // 2, 2 * e.qat_iters, pytest.approx(0.7 * cfg.qat_lr))
    middle = choose_architecture(768, 512, 3, 60000, cfg)  # between the two sizes: between their polishes
    assert e.iters // 2 < schedule(512, 768, arch=middle)[0] < 3 * e.iters // 2
    assert schedule(256, 256) == (0, e.qat_iters, cfg.qat_lr)
    polish, qat_iters, qat_lr = schedule(384, 384)  # between the measured shares: between their schedules
    assert 0 < polish < fit.sparse_schedule(1.0, e, cfg, small, 384 * 384)[0]
    assert e.qat_iters < qat_iters < 2 * e.qat_iters and 0.7 * cfg.qat_lr < qat_lr
    e2 = fit.EFFORTS[2]
    assert schedule(512, 768, e2, large) == (0, e2.qat_iters, cfg.qat_lr)
    e3 = fit.EFFORTS[3]  # the shortest long stages (NOTES.md #194): half a stage's polish at 0.05 parameters a pixel
    assert schedule(512, 768, e3) == (e3.iters // 2, 2 * e3.qat_iters, pytest.approx(0.7 * cfg.qat_lr))
    plain = choose_architecture(64, 64, 3, 1500, cfg)
    assert schedule(512, 768, arch=plain) == (0, e.qat_iters, cfg.qat_lr)


def _polished(cfg):
    """A tiny fit whose steps sample 1/64 of a 64x64 image, its stages counted as long: a polishing stage follows.
    Returns the fitter and the fit's MSE."""
    from pillow_nif.bitstream import Header

    cfg = dataclasses.replace(cfg, matrix_decay_iters=12)
    effort = fit.Effort(2, 12, 1, 6, 16)
    arch = choose_architecture(64, 64, 3, 6000, cfg)
    target = np.random.default_rng(0).uniform(-1, 1, (64, 64, 3)).astype(np.float32)
    f = fit.Fitter(target, arch, "cpu", effort, cfg, 0)
    assert arch.mod_widths and f.stride == 8 and f.qat_iters == 12
    assert f.polish_iters == round(cfg.polish[1] * 12)
    ticks = []
    best = f.fit(lambda n: ticks.append(n))
    # the progress bar's total counts the polishing and the longer tuning
    assert sum(ticks) + effort.qat_stages * f.qat_iters == fit.fit_work(Header(64, 64, "RGB", 0, arch), effort, cfg)
    return f, best


def test_the_polishing_stage_keeps_the_fits_best_weights():
    unpolished = _polished(FitConfig(polish=(0, 0)))[1]
    f, best = _polished(FitConfig())
    assert f.mse() == pytest.approx(best, rel=1e-6) and best < unpolished
    # a polish that diverges is thrown away: the weights are those the stages before it ended with
    f, diverged = _polished(FitConfig(polish_lr=1e4))
    assert diverged == unpolished and f.mse() == pytest.approx(unpolished, rel=1e-6)


def test_plain_networks_fit_with_adamw():
    # Muon fitted the unmodulated networks of 0.3 bpp better, but their files came out worse (NOTES.md #84)
    cfg = FitConfig()
    arch = choose_architecture(64, 64, 3, 1500, cfg)
    assert not arch.mod_widths
    f = fit.Fitter(np.zeros((16, 16, 3)), arch, "cpu", fit.EFFORTS[1], cfg, 0)
    opt = f.optimizer(1e-3, 1e-4, tuning=False)
    assert isinstance(opt, AdamW)
    # the input layer decays at its own rate (+0.09 dB at 0.3 bpp on 8 crops, NOTES.md #87), the rest as asked
    first = f.model.named_tensors()[0]
    assert first[0] == "genesis.0.weight"
    assert [(g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [(cfg.input_decay, 1), (1e-4, 7)]
    assert opt.param_groups[0]["params"][0] is first[1]


def test_collapse_guard_sees_the_state_of_both_optimisers():
    # The guard saves and restores every per-element optimiser state it finds through opt.state, so Chain
    # must expose Muon's momentum and AdamW's moments alike (and not create empty entries looking them up).
    cfg = FitConfig()
    f = fit.Fitter(np.zeros((16, 16, 3)), choose_architecture(64, 64, 3, 8000, cfg), "cpu", fit.EFFORTS[1], cfg, 0)
    params = list(f.model.parameters())
    opt = f.optimizer(1e-3, 0.0, tuning=False)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    saved = fit.CollapseGuard(params, opt).tensors()[len(params):]
    state = [t for o in opt.optimizers for s in o.state.values() for t in s.values() if t.dim()]
    # Muon keeps one tensor per matrix (its momentum), AdamW two per parameter (exp_avg, exp_avg_sq)
    assert len(state) == len(saved) == 2 * len(params) - len(f.model.arch.widths)
    assert all(any(t is u for u in saved) for t in state)
    assert all(len(o.state) == sum(len(g["params"]) for g in o.param_groups) for o in opt.optimizers)


@pytest.mark.parametrize("make", [lambda ps: Muon(ps, lr=1.0, weight_decay=1.0),
                                  lambda ps: AdamW(ps, lr=1.0, weight_decay=0.5)], ids=["muon", "adamw"])
def test_a_rate_on_the_device_steps_as_the_float_rate_and_is_read_at_every_step(make):
    # A CUDA graph's step (stepgraph.py) bakes Python floats in; it reads the rate from a tensor filled in place.
    g = torch.Generator().manual_seed(3)
    shapes = [(8, 5), (3, 6), (2, 7, 4)]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(6)]
    rates = [1e-3 * (i + 1) for i in range(6)]

    def run(on_device: bool):
        ps = [torch.ones(s, requires_grad=True) for s in shapes]
        opt = make(ps)
        lr = torch.zeros(())
        for group in opt.param_groups:
            group["lr"] = lr
        for rate, gs in zip(rates, grads):
            lr.fill_(rate)  # set once above: each step must read the tensor's current value
            if not on_device:
                for group in opt.param_groups:
                    group["lr"] = rate
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            opt.step()
        return [p.detach() for p in ps]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device_rate", [False, True])
def test_a_group_with_an_lr_scale_steps_that_much_further(device_rate):
    # fit.FitConfig.period_lr's group: AdamW scales its rate by lr_scale, whether the rate is a float or the 0-d tensor
    # CUDA graphs read (stepgraph.py). Adam's first step moves each element by ~lr, whatever the gradient.
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    lr = torch.tensor(1e-3) if device_rate else 1e-3
    opt = AdamW([{"params": [a]}, {"params": [b], "lr_scale": 10.0}], lr=lr, weight_decay=0.0)
    for p in (a, b):
        p.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    assert torch.allclose(b.detach(), 10 * a.detach()) and torch.allclose(a.detach().abs(), torch.full((3,), 1e-3))
