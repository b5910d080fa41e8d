"""Golden vectors: stored .nif files must keep decoding to their stored pixels (format stability)."""

import numpy as np
import pytest
from conftest import DATA, assert_decoders_agree
from PIL import Image

import pillow_nif

VECTORS = sorted(p.stem for p in DATA.glob("v*.nif"))


def test_vectors_are_present():
    assert len(VECTORS) >= 4


@pytest.mark.parametrize("name", VECTORS)
def test_vector_decodes_to_its_pixels(name):
    expected = np.load(DATA / f"{name}.npy")
    im = Image.open(DATA / f"{name}.nif")
    got = np.asarray(im).reshape(expected.shape)
    assert_decoders_agree(got, expected)
    info = pillow_nif.info(DATA / f"{name}.nif")
    assert info["version"] == int(name[1]) and (info["width"], info["height"]) == im.size
