"""benchmarks/cached_fit.py: its reference variant is the encoder's file, and each variant codes its own copy of the
fit, so the variants' differences are theirs."""

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cached_fit  # noqa: E402

from pillow_nif import fit  # noqa: E402


def _image(w, h):
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([128 + 100 * np.sin(x / 5), 128 + 90 * np.cos(y / 4), 128 + 60 * np.sin((x + y) / 7)], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]


def test_the_reference_variant_is_the_encoders_file_and_the_others_code_their_own_copy():
    im = _image(56, 40)  # every pixel a step
    records = cached_fit.run_image("waves", im, 1.0, 2, ["ref", "none", "3.0:0.7", "qat_lr=1e-05", "qat_lr=4e-05"],
                                  seed=0)
    encoded = fit.encode_image(im, bpp=1.0, effort=2, device="cpu", seed=0, measure=False).data
    ref, none, again, same, faster = records
    assert ref["sha1"] == _sha(encoded) and not ref["refit"]
    assert abs(ref["psnr"] - _psnr(encoded, im)) < 1e-9
    assert none["tuning_steps"] == 0 and none["sha1"] != ref["sha1"]
    # A small image's steps sample all of it (sparseness 0): "3.0:0.7" is its committed schedule, and coded from its
    # own copy of the fit it gives ref's file again: coding one variant leaves the cached fit as it was.
    assert again["sha1"] == ref["sha1"]
    assert same["sha1"] == ref["sha1"]  # FitConfig's own qat_lr, given as a field
    assert faster["tuning_lr"] == 4e-5 and faster["sha1"] != ref["sha1"]


def test_variants_that_draw_their_pixels_start_from_the_same_generator_and_sampler():
    """96x80 at effort 1: 4k pixels a step, every 2nd row and column, drawn by the importance sampler from the fit's
    generator. Were the copies to share it, the second variant would draw other pixels and code another file."""
    im = _image(96, 80)
    records = cached_fit.run_image("waves", im, 1.0, 1, ["ref", "2.0:1.0", "1.0:1.0:4"], seed=0)
    encoded = fit.encode_image(im, bpp=1.0, effort=1, device="cpu", seed=0, measure=False).data
    ref, again, denser = records
    assert ref["sha1"] == _sha(encoded) == again["sha1"]
    assert denser["sha1"] != ref["sha1"] and denser["bytes"] <= 96 * 80 // 8


def test_variants_that_would_change_nothing_are_refused():
    cached_fit.check_variant("qat_lr=5e-06;sparse_qat_iters=1.5")
    cached_fit.check_variant("1.0:0.7:4")
    for bad in ("lr=1e-3", "polish_lr=0.2", "1.0", "a:b", "1:2:3:4"):
        with pytest.raises(SystemExit):
            cached_fit.check_variant(bad)


def _psnr(data: bytes, im) -> float:
    from pillow_nif.render import decode_array

    a = decode_array(data).astype(np.float64).reshape(im.height, im.width, 3)
    return 10 * np.log10(255**2 / np.mean((a - np.asarray(im, np.float64)) ** 2))
