"""The post-filter (format versions 6-8): its maths, its container fields, its encoder and its decoders."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import pillow_nif
from pillow_nif import bitstream as bs
from pillow_nif import fit, postfilter
from pillow_nif.bitstream import Architecture, FormatError, Header, NifFile, TensorCoding
from pillow_nif.render import decode_array, load_network, render, resample

from conftest import ROOT, assert_decoders_agree
from test_bitstream import _payload, _with_payload

EXAMPLE = ROOT / "examples" / "kodim23-crop.png"


def smooth_image(h, w, c, seed=0):
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    return np.stack([0.5 + 0.3 * np.sin(7 * x * (k + 1) + 5 * y + g.uniform(0, 6)) for k in range(c)], -1) + \
        0.02 * g.standard_normal((h, w, c))


def random_filter(c, d, seed=1, classes=1):
    g = np.random.default_rng(seed)
    k = classes * c
    return 0.05 * g.standard_normal((k, c)), 0.1 * g.standard_normal((k, c * d)), 0.01 * g.standard_normal(k)


REACH4 = ((0, 1), (4, -3), (2, 2), (3, 0), (0, 4))  # a version-7 set: four rows and columns of reach


@pytest.mark.parametrize("c, dirs", [(3, postfilter.DIRECTIONS[:4]), (1, postfilter.DIRECTIONS), (4, REACH4)])
def test_least_squares_recovers_a_filter_and_the_torch_filter_matches_numpy(c, dirs):
    u = smooth_image(37, 29, c)
    coef = random_filter(c, len(dirs))
    target = postfilter.apply_numpy(u, *coef, dirs, band_pixels=100)  # bands of 3 rows: their halos matter
    got = postfilter.fit(u, target, dirs, band_pixels=200)
    for a, b in zip(got, coef):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # torch, on a band with its halo rows (edge rows repeated), as render() calls it
    r = postfilter.radius(dirs)
    rows = np.clip(np.arange(10 - r, 20 + r), 0, 36)
    x = torch.from_numpy(u[rows])
    out = postfilter.apply(x, *postfilter.kernel(*(torch.from_numpy(t) for t in coef), dirs)).numpy()
    np.testing.assert_allclose(out, target[10:20], atol=1e-12)
    assert postfilter.radius(postfilter.DIRECTIONS[:4]) == 1 and postfilter.radius(REACH4) == 4
    # the encoder's search: every candidate's rounded error in one pass, the same as filtering each
    ref = np.round(smooth_image(37, 29, c, seed=2).clip(0, 1) * 255) / 255
    zero = [np.zeros_like(t) for t in coef]
    rounded = lambda v: np.floor(np.clip(v, 0, 1) * 255 + 0.5) / 255  # noqa: E731
    want = [np.sum((rounded(postfilter.apply_numpy(u, *k, dirs)) - ref) ** 2) for k in (zero, coef)]
    np.testing.assert_allclose(postfilter.squared_errors(u, ref, [zero, coef], 255, dirs, band_pixels=100), want)


@pytest.mark.parametrize("step, classes", [(2, 1), (3, 3)])
def test_the_encoders_choices_sum_every_step_th_row_and_rank_by_the_exact_sums(step, classes):
    """Large images choose the neighbours and thresholds on every s-th row (row_step): the sums are those of the
    full image's rows r0, r0 + s, ... (the other rows put in a class of their own here), their design built from
    the full image's neighbours. removed_error() is the unrounded, unclamped output's error removed, from the sums."""
    u = smooth_image(31, 23, 3)
    dirs = tuple(postfilter.OFFSETS[i] for i in (0, 5, 17, 39))
    target = postfilter.apply_numpy(u, *random_filter(3, 4), dirs) + 0.01 * np.random.default_rng(3).random(u.shape)
    cls = postfilter.classes(u, postfilter.thresholds_for(u, classes)) if classes > 1 else np.zeros((31, 23), int)
    kept = np.where((np.arange(31) % step == 0)[:, None], cls, classes)
    for bp in (23, 5 * 23, 1 << 16):  # bands of 1 row, of 5 (not a multiple of the step) and the whole image
        got = postfilter.normal_equations(u, target, dirs, cls, classes, bp, step=step)
        want = postfilter.normal_equations(u, target, dirs, kept, classes + 1)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b[:classes], rtol=1e-12, atol=1e-13)
    assert postfilter.select(u, target, 4, cls, classes, step=step)[0] == dirs
    sums = postfilter.normal_equations(u, target, dirs, cls, classes)
    best = postfilter.solve(*sums)
    candidates = [best, [0.9 * t for t in best], [np.zeros_like(t) for t in best]]
    error = lambda f: np.sum((postfilter.apply_numpy(u, *f, dirs, cls) - target) ** 2)  # noqa: E731
    want = [error(candidates[2]) - error(f) for f in candidates]
    np.testing.assert_allclose(postfilter.removed_error(*sums, candidates), want, rtol=1e-9, atol=1e-12)
    assert want[0] > want[1] > want[2] == 0
    assert postfilter.row_step(512, 768) == 2 and postfilter.row_step(384, 512) == 1
    assert postfilter.row_step(768, 768) == 3 and postfilter.row_step(1, 1) == 1


def test_the_encoders_selection_finds_the_neighbours_a_filter_uses():
    """Forward selection over all 40 offsets: a target made by a filter on 5 scattered offsets (one 4 pixels away)
    gets those 5 back, in OFFSETS order, with their coefficients."""
    u = np.random.default_rng(4).uniform(0, 1, (40, 33, 3))
    dirs = tuple(postfilter.OFFSETS[i] for i in (1, 6, 13, 22, 39))
    coef = random_filter(3, 5)
    target = postfilter.apply_numpy(u, *coef, dirs)
    got_dirs, got = postfilter.select(u, target, 5, band_pixels=300)
    assert got_dirs == dirs and postfilter.directions(postfilter.mask_of(dirs)) == dirs
    for a, b in zip(got, coef):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("dirs", [postfilter.DIRECTIONS[:4], REACH4])
def test_classes_split_the_pixels_by_activity_and_each_class_gets_its_own_filter(dirs):
    """Version 8: the thresholds split the pixels into classes of about equal size; least squares per class gets
    each class's filter back, forward selection its offsets; the decoder's torch path (the activity of a band from
    its halo rows, 2 even for a 3x3 filter) classifies and filters each pixel as the encoder's numpy does."""
    u = smooth_image(37, 29, 3)
    thresholds = postfilter.thresholds_for(u, 3)
    cls = postfilter.classes(u, thresholds)
    assert len(thresholds) == 2 and np.bincount(cls.ravel()).tolist() == pytest.approx([358, 357, 358], abs=2)
    coef = random_filter(3, len(dirs), classes=3)
    target = postfilter.apply_numpy(u, *coef, dirs, cls, band_pixels=100)
    for a, b in zip(postfilter.fit(u, target, dirs, cls, 3, band_pixels=200), coef):
        np.testing.assert_allclose(a, b, atol=1e-6)
    got_dirs, got = postfilter.select(u, target, len(dirs), cls, 3, band_pixels=300)
    assert got_dirs == tuple(o for o in postfilter.OFFSETS if o in dirs)
    h = postfilter.halo(dirs, 3)
    assert h == max(2, postfilter.radius(dirs)) and postfilter.halo(dirs) == postfilter.radius(dirs)
    weight, bias = postfilter.kernel(*(torch.from_numpy(t) for t in coef), dirs)
    for r0, r1 in ((10, 20), (0, 37), (33, 37)):  # a middle band, the whole image, the last rows
        x = torch.from_numpy(u[np.clip(np.arange(r0 - h, r1 + h), 0, 36)])
        np.testing.assert_allclose(postfilter.apply(x, weight, bias, thresholds).numpy(), target[r0:r1], atol=1e-12)
    # each class's error is its own filter's: other classes' coefficients leave it alone
    one = postfilter.apply_numpy(u, coef[0][3:6], coef[1][3:6], coef[2][3:6], dirs)
    np.testing.assert_allclose(target[cls == 1], one[cls == 1], atol=1e-12)


def test_the_encoders_split_of_the_classes_is_the_best_on_its_grid():
    """postfilter.split: the thresholds among an activity grid whose classes' filters leave the least error, as an
    exhaustive search over the grid finds them, and never worse than classes of equal size (on the grid too)."""
    rng = np.random.default_rng(5)
    target = smooth_image(41, 36, 3)
    # the network's error grows across the image and differs in kind between flat and busy pixels
    u = target + 0.02 * rng.standard_normal(target.shape) * np.linspace(0, 1, 36)[None, :, None]
    u += 0.3 * (postfilter.activity(target) > np.median(postfilter.activity(target)))[..., None] * (
        np.roll(target, 1, 1) - target)
    dirs = postfilter.DIRECTIONS[:4]
    grid = postfilter.thresholds_for(u, 12)

    def error(thresholds):
        cls = postfilter.classes(u, thresholds)
        coef = postfilter.fit(u, target, dirs, cls, len(thresholds) + 1)
        return float(np.sum((postfilter.apply_numpy(u, *coef, dirs, cls) - target) ** 2))

    for count in (2, 3, 4):
        got = postfilter.split(u, target, dirs, count, bins=12)
        assert len(got) == count - 1 and set(got) <= set(grid)
        best = min(itertools.combinations(grid, count - 1), key=error)
        assert error(got) == pytest.approx(error(best), rel=1e-9)
        assert error(got) <= error(postfilter.thresholds_for(u, count)) * (1 + 1e-12)
    assert postfilter.split(np.full((8, 9, 3), 0.25), np.full((8, 9, 3), 0.3), dirs, 4) == ()  # flat: one class


def test_the_encoders_thresholds_stay_clear_of_the_pixels_activities():
    """Two decoders' network values differ in their last bits, and so do their activities: a threshold nearly on a
    pixel's activity gives that pixel another class's filter in one of them, levels away. postfilter.clear_of_pixels
    moves each threshold into the widest gap among the pixels near it, so that a difference of 1e-6 in every value
    (torch and the Triton kernel differed by up to 0.9e-6 and 1.5e-6 on two Kodak files) changes no pixel's class."""
    rng = np.random.default_rng(0)
    u = np.clip(np.asarray(Image.open(EXAMPLE).convert("RGB"), np.float64) / 255 + rng.normal(0, 1e-3, (256, 256, 3)),
                0, 1)  # a decode is not on the 8-bit grid, so its activities rarely tie
    a = np.sort(postfilter.activity(u), axis=None)
    quantiles = postfilter.thresholds_for(u, 4)
    moved = postfilter.clear_of_pixels(u, quantiles, window=1 / 256)
    assert all(np.float32(t) == t for t in moved) and 0 < moved[0] < moved[1] < moved[2]
    reach = a.size // 256
    for t in moved:
        i = int(np.searchsorted(a, t))
        mean_gap = (a[i + reach] - a[i - reach]) / (2 * reach)
        assert np.abs(a - t).min() >= 2 * mean_gap  # the quantiles themselves were within 0.03 of one
    assert np.mean(postfilter.classes(u, moved) != postfilter.classes(u, quantiles)) <= 2 * 3 / 256
    for _ in range(3):
        v = u + rng.uniform(-1e-6, 1e-6, u.shape)
        assert np.array_equal(postfilter.classes(v, moved), postfilter.classes(u, moved))
    near = tuple(float(np.float32(a[i])) + 1e-9 for i in (30000, 30003, 30006))  # windows overlap: order kept
    moved = postfilter.clear_of_pixels(u, near, window=1 / 16)
    assert moved[0] < moved[1] < moved[2] and all(np.float32(t) == t for t in moved) and moved[1] < near[2]
    assert postfilter.clear_of_pixels(np.full((8, 9, 3), 0.25), (0.5,)) == (0.5,)  # no gap to move into


def test_a_flat_image_gives_a_zero_filter_not_an_error():
    u = np.full((8, 9, 3), 0.25)
    dirs, (mix, taps, offset) = postfilter.select(u, u + 0.01, 4)
    assert len(dirs) == 4
    np.testing.assert_allclose(postfilter.apply_numpy(u, mix, taps, offset, dirs), u + 0.01, atol=1e-6)
    assert postfilter.thresholds_for(u, 4) == ()  # every pixel's activity is 0: one class


ARCH = Architecture(3, (12, 6), 2, 1.4, 45.0, filter_mask=0xF)
CODINGS = [TensorCoding(2**-7, 7, bs.MODEL_LAPLACE, bs.LAPLACE_PARAMS[40])] * len(ARCH.tensor_shapes())


def test_version_6_stores_the_filter_size_in_the_header_and_its_tensors_after_the_networks():
    shapes = ARCH.tensor_shapes()
    assert shapes[-3:] == [("filter.mix", (3, 3)), ("filter.taps", (3, 12)), ("filter.offset", (3,))]
    assert dataclasses.replace(ARCH, filter_mask=0).num_params() == ARCH.num_params() - 9 - 36 - 3
    f = NifFile(Header(20, 10, "RGB", 1, ARCH), CODINGS, b"\x01\x00\x00\x00" * 8)
    data = bs.dumps(f)
    assert data[7] == 6 and bs.loads(data).header == f.header  # the first 4 offsets: version 6 holds them
    plain = bs.dumps(dataclasses.replace(f, header=Header(20, 10, "RGB", 1, dataclasses.replace(ARCH, filter_mask=0)),
                                         codings=CODINGS[:-3]))
    assert plain[7] == 4  # no filter: version 4's bytes, as before
    with pytest.raises(ValueError, match="version 6"):
        bs.dumps(dataclasses.replace(f, version=5))


def test_version_7_stores_any_set_of_neighbours_as_a_mask():
    # the container's limits are the filter's table (bitstream.py stays free of numpy)
    assert len(set(postfilter.OFFSETS)) == bs.FILTER_OFFSETS and postfilter.radius(postfilter.OFFSETS) == 4
    assert not {(-i, -j) for i, j in postfilter.OFFSETS} & set(postfilter.OFFSETS)  # one of each pair
    assert postfilter.OFFSETS[: bs.V6_FILTER_TAPS] == postfilter.DIRECTIONS
    arch = dataclasses.replace(ARCH, filter_mask=postfilter.mask_of(REACH4) | 1 << 39)
    assert arch.filter_taps == 6 and arch.tensor_shapes()[-2] == ("filter.taps", (3, 18))
    codings = CODINGS[:-3] + [CODINGS[0]] * 3
    f = NifFile(Header(20, 10, "RGB", 1, arch), codings, b"\x01\x00\x00\x00" * 8)
    data = bs.dumps(f)
    assert data[7] == 7 and bs.loads(data).header == f.header
    assert postfilter.directions(bs.loads(data).header.arch.filter_mask) == tuple(
        o for o in postfilter.OFFSETS if o in REACH4 or o == postfilter.OFFSETS[39])
    with pytest.raises(ValueError, match="version 7"):
        bs.dumps(dataclasses.replace(f, version=6))
    with pytest.raises(FormatError, match="neighbours out of range"):
        dataclasses.replace(arch, filter_mask=1 << 40).validate()


@pytest.mark.parametrize("edit, message", [
    (lambda p: p[:-1] + b"\x00", "post-filter size 0"),
    (lambda p: p[:-1] + b"\x0d", "post-filter size 13"),
    (lambda p: p[:-1], "truncated"),
    (lambda p: p[:4] + bytes([p[4] | 8]) + p[5:], "unknown header flags"),  # flags after 1-byte sizes, mode, F
])
def test_version_6_header_fields_are_checked(edit, message):
    data = bs.dumps(NifFile(Header(20, 10, "RGB", 1, ARCH), CODINGS, b"\x01\x00\x00\x00" * 8))
    with pytest.raises(FormatError, match=message):
        bs.loads(_with_payload(data, b"NHDR", edit(_payload(data, b"NHDR"))))
    # the flag in a version-5 file is refused: earlier versions have no filter
    v5 = data[:7] + b"\x05" + data[8:]
    with pytest.raises(FormatError, match="unknown header flags"):
        bs.loads(v5)


def test_version_8_stores_the_classes_thresholds_and_their_coefficient_sets():
    arch = dataclasses.replace(ARCH, filter_thresholds=(0.0, 0.125, 3.5))
    assert arch.filter_classes == 4 and arch.tensor_shapes()[-3:] == [
        ("filter.mix", (12, 3)), ("filter.taps", (12, 12)), ("filter.offset", (12,))]
    f = NifFile(Header(20, 10, "RGB", 1, arch), CODINGS, b"\x01\x00\x00\x00" * 8)
    data = bs.dumps(f)
    assert data[7] == 8 and bs.loads(data).header == f.header
    assert _payload(data, b"NHDR")[-13:] == b"\x03" + np.array([0.0, 0.125, 3.5], "<f4").tobytes()
    with pytest.raises(ValueError, match="version 8"):
        bs.dumps(dataclasses.replace(f, version=7))
    for bad in ((0.5, 0.5), (0.5, 0.25), (-1.0,), (float("nan"),), (float("inf"),), tuple(range(8))):
        with pytest.raises(FormatError, match="thresholds out of range"):
            dataclasses.replace(arch, filter_thresholds=bad).validate()
    with pytest.raises(FormatError, match="classes without a post-filter"):
        dataclasses.replace(arch, filter_mask=0).validate()


@pytest.mark.parametrize("edit, message", [
    (lambda p: p[:-13] + b"\x00", "classes 1 out of range"),
    (lambda p: p[:-13] + b"\x08" + p[-12:] + bytes(20), "classes 9 out of range"),
    (lambda p: p[:-1], "truncated"),
    (lambda p: p[:-4] + np.array([0.1], "<f4").tobytes(), "thresholds out of range"),  # below the one before
    (lambda p: p[:-4] + np.array([np.nan], "<f4").tobytes(), "thresholds out of range"),
    (lambda p: p[:4] + bytes([p[4] & ~4]) + p[5:-18] + p[-13:], "classes without a post-filter"),
    (lambda p: p[:4] + bytes([p[4] | 16]) + p[5:], "unknown header flags"),
])
def test_version_8_header_fields_are_checked(edit, message):
    arch = dataclasses.replace(ARCH, filter_thresholds=(0.0, 0.125, 3.5))
    data = bs.dumps(NifFile(Header(20, 10, "RGB", 1, arch), CODINGS, b"\x01\x00\x00\x00" * 8))
    with pytest.raises(FormatError, match=message):
        bs.loads(_with_payload(data, b"NHDR", edit(_payload(data, b"NHDR"))))
    v7 = data[:7] + b"\x07" + data[8:]  # the flag in a version-7 file is refused
    with pytest.raises(FormatError, match="unknown header flags"):
        bs.loads(v7)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p[:-5] + bytes(5), "without neighbours"),
    (lambda p: p[:-1], "truncated"),
    (lambda p: p + b"\x00", "trailing bytes"),
])
def test_version_7_header_fields_are_checked(edit, message):
    arch = dataclasses.replace(ARCH, filter_mask=0b1010)
    data = bs.dumps(NifFile(Header(20, 10, "RGB", 1, arch), CODINGS, b"\x01\x00\x00\x00" * 8))
    assert data[7] == 7
    with pytest.raises(FormatError, match=message):
        bs.loads(_with_payload(data, b"NHDR", edit(_payload(data, b"NHDR"))))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_the_least_squares_sums_on_torch_tensors_are_numpys(device):
    """On CUDA the encoder's post-filter sums (postfilter.on_device) run in torch on the GPU; CPU tensors take the
    same path. Activity and classes come out bit for bit (the same float64 operations, one at a time); the
    normal equations and errors to the rounding of another summation order; so the neighbours and thresholds the
    encoder picks are the same."""
    u = smooth_image(41, 33, 3)
    coef = random_filter(3, 5, classes=3)
    dirs = tuple(postfilter.OFFSETS[i] for i in (0, 3, 9, 17, 30))
    cls = postfilter.classes(u, postfilter.thresholds_for(u, 3))
    target = postfilter.apply_numpy(u, *coef, dirs, cls) + 0.003 * np.random.default_rng(2).standard_normal(u.shape)
    ut, tt = (torch.from_numpy(a).to(device) for a in (u, target))
    assert postfilter.thresholds_for(ut, 5) == postfilter.thresholds_for(u, 5)
    clt = postfilter.classes(ut, postfilter.thresholds_for(u, 3))
    assert isinstance(clt, torch.Tensor) and np.array_equal(clt.cpu().numpy(), cls)
    np.testing.assert_array_equal(postfilter.activity(ut).cpu().numpy(), postfilter.activity(u))
    for c, k, bp in ((None, 1, 300), (cls, 3, 300), (cls, 4, 1 << 16)):  # a class with no pixel: count 4
        want = postfilter.normal_equations(u, target, postfilter.OFFSETS, c, k, bp)
        got = postfilter.normal_equations(ut, tt, postfilter.OFFSETS, None if c is None else clt, k, bp)
        for a, b in zip(got, want):
            assert isinstance(a, np.ndarray)
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    for got, want in zip(postfilter.normal_equations(ut, tt, dirs, clt, 3, 200, step=3),
                         postfilter.normal_equations(u, target, dirs, cls, 3, 200, step=3)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert postfilter.select(ut, tt, 5, clt, 3)[0] == postfilter.select(u, target, 5, cls, 3)[0] == dirs
    assert postfilter.split(ut, tt, dirs, 3, bins=12) == postfilter.split(u, target, dirs, 3, bins=12)
    assert postfilter.clear_of_pixels(ut, (0.05, 0.2)) == postfilter.clear_of_pixels(u, (0.05, 0.2))
    candidates = [random_filter(3, 5, seed=s, classes=3) for s in range(4)]
    np.testing.assert_allclose(postfilter.squared_errors(ut, tt, candidates, 255, dirs, clt, band_pixels=200),
                               postfilter.squared_errors(u, target, candidates, 255, dirs, cls), rtol=1e-9)


def test_on_device_moves_the_arrays_to_cuda_only():
    u, t = np.zeros((2, 3, 3)), np.ones((2, 3, 3))
    assert postfilter.on_device(u, t, "cpu") == (u, t)  # the CPU keeps numpy (and its bytes)
    if torch.cuda.is_available():
        got = postfilter.on_device(u, t[:, ::-1], "cuda")
        assert all(a.is_cuda and a.dtype == torch.float64 for a in got)


def test_an_encode_through_the_torch_sums_writes_the_same_file(filtered_file, monkeypatch):
    """The whole post-filter stage on tensors (CUDA's path, here on CPU tensors) gives the numpy path's file."""
    im, r = filtered_file
    monkeypatch.setattr(postfilter, "on_device", lambda u, t, device: (torch.from_numpy(u), torch.from_numpy(t)))
    assert fit.encode_image(im, bpp=1.5, effort=1, seed=3).data == r.data


@pytest.fixture(scope="module")
def filtered_file():
    """A 1.5 bpp encode of a 256x192 piece of the example (a 5x5 filter's budget), effort 1."""
    im = Image.open(EXAMPLE).convert("RGB").crop((0, 32, 256, 224))
    return im, fit.encode_image(im, bpp=1.5, effort=1, seed=3)


def test_the_encoder_adds_a_filter_that_pays_within_the_budget(filtered_file):
    im, r = filtered_file
    f = bs.loads(r.data)
    assert f.header.arch.filter_taps == 12  # the 12 offsets of 40 that help this image most
    assert f.version == (6 if postfilter.directions(f.header.arch.filter_mask) == postfilter.DIRECTIONS else 7)
    assert len(r.data) <= im.width * im.height * 1.5 / 8
    ref = np.asarray(im, dtype=np.float64)
    net = load_network(f)
    alone = dataclasses.replace(net, filter=None)
    psnr = lambda a: 10 * np.log10(255**2 / np.mean((a.astype(np.float64) - ref) ** 2))  # noqa: E731
    assert psnr(decode_array(r.data)) == pytest.approx(r.psnr)
    assert r.psnr > psnr(render(alone, im.width, im.height)) + 0.05  # the filter is worth its bytes here


def test_the_filter_applies_at_the_stored_size_only_and_bands_agree_with_the_whole_image(filtered_file, monkeypatch):
    im, r = filtered_file
    net = load_network(bs.loads(r.data))
    alone = dataclasses.replace(net, filter=None)
    w, h = im.size
    np.testing.assert_array_equal(decode_array(r.data, size=(2 * w, h)), render(alone, 2 * w, h))
    # a smaller size is made from the stored one, filter and all
    half = (w // 2, h // 2)
    np.testing.assert_array_equal(decode_array(r.data, size=half), resample(decode_array(r.data), half))
    u = render(net, w, h, raw=True).astype(np.float64) / 255
    coef = (t.double().numpy() for t in net.filter)
    want = np.floor(np.clip(postfilter.apply_numpy(u, *coef, net.filter_dirs), 0, 1) * 255 + 0.5)
    from pillow_nif import render as render_module

    monkeypatch.setattr(render_module, "_CPU_BAND_PIXELS", 3 * 256)  # bands of a few rows: halos and the kept rows
    got = decode_array(r.data)
    assert np.abs(got.astype(np.int64) - want).max() <= 1 and np.mean(got != want) < 0.001


def test_no_filter_where_the_budget_cannot_afford_one_or_when_asked():
    crop = 256 * 256
    assert fit.choose_filter(1500, 3, crop) == (1, 0) and fit.choose_filter(2457, 3, crop) == (1, 4)  # 0.3 bpp
    assert fit.choose_filter(4915, 3, crop) == (1, 12) and fit.choose_filter(8192, 3, crop) == (1, 12)  # 0.6, 1.0
    assert fit.choose_filter(600, 1, crop) == (1, 0) and fit.choose_filter(1000, 1, crop) == (1, 4)
    # a crop keeps one set of coefficients at any rate: classes lost on crops (NOTES #140)
    assert fit.choose_filter(3000, 1, crop) == (1, 12) and fit.choose_filter(60000, 3, crop) == (1, 12)
    assert fit.choose_filter(60, 3, 16) == (1, 0)  # tiny images: no filter, no classes
    im = Image.open(EXAMPLE).convert("RGB").resize((64, 48))
    off = fit.encode_image(im, bpp=2.0, effort=1, config=dataclasses.replace(fit.FitConfig(), post_filter=False))
    assert bs.loads(off.data).version <= 5 and bs.loads(off.data).header.arch.filter_taps == 0
    assert pillow_nif.info(off.data)["version"] <= 5


@pytest.mark.parametrize("rows", [1, 2])
def test_larger_files_get_a_filter_with_classes(monkeypatch, rows):
    """768x512 RGB: 2 classes on 12 pairs at 0.3 bpp, 4 at 0.6, 4 on 20 pairs at 1.0 (their reserve 1.4 / 1.3 / 1.2 %
    of the file); an encode with classes is version 8, within its budget, decodes to the PSNR it reports, and its
    filter pays, with its choices made on every row or (as 768x512) every 2nd."""
    monkeypatch.setattr(postfilter, "SELECT_PIXELS", 256 * 256 // rows)
    full = 768 * 512
    assert [fit.choose_filter(int(b * full / 8), 3, full) for b in (0.3, 0.6, 1.0)] == [(2, 12), (4, 12), (4, 20)]
    assert fit.choose_filter(12000, 3, full) == (2, 12) and fit.choose_filter(20480, 3, full) == (4, 12)
    assert fit.choose_filter(20480, 3, 2 * 65536) == (2, 12)  # 2 classes' pixels, not 4
    assert fit.filter_reserve(3, 12, 4) == 5 + 13 + 15 + 360 + 4  # mask, 3 thresholds, records, coefficients, a word
    # the encode path with classes on a small image (quick): 256x256 at 2.5 bpp (20 kB) as if it had the pixels
    choose = fit.choose_filter
    monkeypatch.setattr(fit, "choose_filter", lambda budget, c, pixels: choose(budget, c, full))
    im = Image.open(EXAMPLE).convert("RGB")
    r = fit.encode_image(im, bpp=2.5, effort=1, seed=3)
    f = bs.loads(r.data)
    assert f.version == 8 and f.header.arch.filter_classes == 4 and f.header.arch.filter_taps == 12
    assert len(r.data) <= 256 * 256 * 2.5 / 8 and pillow_nif.info(r.data)["post_filter_classes"] == 4
    ref = np.asarray(im, dtype=np.float64)
    psnr = lambda a: 10 * np.log10(255**2 / np.mean((a.astype(np.float64) - ref) ** 2))  # noqa: E731
    assert psnr(decode_array(r.data)) == pytest.approx(r.psnr)
    assert r.psnr > psnr(render(dataclasses.replace(load_network(f), filter=None), 256, 256)) + 0.05


def test_images_encoded_together_get_their_filters_as_one_at_a_time():
    from conftest import photo

    from pillow_nif.batch import encode_batch

    images = [photo(64, 48), photo(64, 48).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]  # 3 kB each: a 3x3 filter
    once = fit.FitConfig(refit_loss=float("inf"))  # one network each (these round 2.5-2.9 dB: fit.refit would try two)
    together = encode_batch(images, bpp=8.0, effort=1, seed=3, config=once)
    alone = fit.encode_image(images[0], bpp=8.0, effort=1, seed=3, config=once)
    for r in together:  # the same network; the neighbours are each fit's own (batched float sums differ a little)
        f = bs.loads(r.data)
        assert f.version >= 6 and f.header.arch.filter_taps == 4 and len(r.data) <= 64 * 48
        assert dataclasses.replace(f.header.arch, filter_mask=0) == dataclasses.replace(bs.loads(alone.data).header.arch, filter_mask=0)


@pytest.mark.parametrize("width, height, band, dirs, classes", [
    (7, 5, 28, REACH4, 1), (3, 1, 3, REACH4, 1), (1, 9, 2, REACH4, 1), (5, 7, 5, REACH4, 1), (1, 1, 1, REACH4, 1),
    (9, 7, 18, postfilter.DIRECTIONS[:4], 3), (6, 11, 6, REACH4, 2), (2, 3, 2, REACH4, 4),
])
def test_filtered_bands_of_any_height_match_the_whole_image_filter(width, height, band, dirs, classes, monkeypatch):
    """Bands of a few rows, a last band shorter than the filter's reach (7x5 in bands of 4 rows), images thinner than
    the filter, filters with classes (whose activity needs 2 halo rows even for a 3x3 filter): the banded decode is
    the filter of the whole image, edges repeated."""
    from pillow_nif import render as render_module
    from pillow_nif.model import NIF, fold

    net = fold(NIF(Architecture(3, (12, 6), 2, 1.4, 45.0)).initialize(torch.Generator().manual_seed(0)), 1, 255.0)
    g = torch.Generator().manual_seed(1)
    u = render(net, width, height, raw=True).astype(np.float64) / 255
    thresholds = postfilter.thresholds_for(u, classes) if classes > 1 else ()
    cls = postfilter.classes(u, thresholds) if thresholds else None
    assert len(thresholds) == classes - 1 and (cls is None or len(np.unique(cls)) == classes)
    k = 3 * classes
    net.filter = (0.05 * torch.randn(k, 3, generator=g), 0.1 * torch.randn(k, 3 * len(dirs), generator=g),
                  0.01 * torch.randn(k, generator=g))
    net.filter_dirs, net.filter_thresholds = dirs, thresholds
    coef = (t.double().numpy() for t in net.filter)
    want = np.floor(np.clip(postfilter.apply_numpy(u, *coef, dirs, cls), 0, 1) * 255 + 0.5)
    monkeypatch.setattr(render_module, "_CPU_BAND_PIXELS", band)
    assert_decoders_agree(render(net, width, height), want)  # float32 against float64: a level on a rare pixel
