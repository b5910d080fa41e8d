"""benchmarks/cached_fit.py: its reference variant is the encoder's file, so its variants' differences are theirs."""

import hashlib
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cached_fit  # noqa: E402

from pillow_nif import fit  # noqa: E402


def _image():
    y, x = np.mgrid[0:40, 0:56]
    rgb = np.stack([128 + 100 * np.sin(x / 5), 128 + 90 * np.cos(y / 4), 128 + 60 * np.sin((x + y) / 7)], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def test_the_reference_variant_is_the_encoders_file_and_the_others_differ():
    im = _image()
    records = cached_fit.run_image("waves", im, 1.0, 2, ["ref", "none", "3.0:0.7", "qat_lr=1e-05", "qat_lr=4e-05"],
                                  seed=0)
    encoded = fit.encode_image(im, bpp=1.0, effort=2, device="cpu", seed=0, measure=False).data
    ref, none, again, same, faster = records
    assert ref["sha1"] == hashlib.sha1(encoded).hexdigest()[:16]
    assert abs(ref["psnr"] - _psnr(encoded, im)) < 1e-9
    assert none["tuning_steps"] == 0 and none["sha1"] != ref["sha1"]
    # A crop's steps sample all of it (sparseness 0): "3.0:0.7" is its committed schedule, and coded from its own
    # copy of the fit it gives ref's file again: coding one variant leaves the cached fit as it was.
    assert again["sha1"] == ref["sha1"]
    assert same["sha1"] == ref["sha1"]  # FitConfig's own qat_lr, given as a field
    assert faster["tuning_lr"] == 4e-5 and faster["sha1"] != ref["sha1"]


def _psnr(data: bytes, im) -> float:
    from pillow_nif.render import decode_array

    a = decode_array(data).astype(np.float64).reshape(im.height, im.width, 3)
    return 10 * np.log10(255**2 / np.mean((a - np.asarray(im, np.float64)) ** 2))
