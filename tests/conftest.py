import os
import pathlib

import numpy as np
import pytest
from PIL import Image

import pillow_nif  # noqa: F401  (registers the plugin)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
PHOTO = ROOT / "examples" / "kodim23-crop.png"
SHARED = pathlib.Path(os.environ.get("PILLOW_NIF_SHARED") or ROOT.parent / "shared")  # elsewhere on a lent GPU


def photo(width=96, height=64, mode="RGB"):
    """A crop of the test photo shipped in the repo (Kodak 23), resized to (width, height)."""
    im = Image.open(PHOTO).convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    return im.convert(mode) if mode != "RGB" else im


@pytest.fixture(scope="session")
def small_nif(tmp_path_factory):
    """A 97x61 RGB photo encoded once for the whole session (fast settings)."""
    path = tmp_path_factory.mktemp("nif") / "small.nif"
    photo(97, 61).save(path, bpp=3.0, effort=1)
    return path


@pytest.fixture
def kodak():
    """Path of Kodak image 23 in ../shared, or skip when shared/ is absent."""
    p = SHARED / "datasets" / "kodak" / "kodim23.png"
    if not p.exists():
        pytest.skip("../shared/datasets/kodak is not available")
    return p


@pytest.fixture
def one_thread():
    """torch on one thread for the test, as the benchmarks' encodes run: the count changes how sums split, and so
    which way a chaotic fit goes (restored after)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_decoders_agree(got, expected, msg=""):
    """Two decodes of the same pixels agree as docs/FORMAT.md requires of decoders: CPUs (and the order of a sum)
    may differ in the last bit of sin, so at most one level apart, on a few samples: 0.1 % of them, and at least two,
    since 0.1 % of a tiny image is none (an AMD EPYC put 1 of the v1-i16 vector's 384 samples one level off)."""
    diff = np.abs(np.asarray(got, dtype=np.int64) - np.asarray(expected, dtype=np.int64))
    assert diff.max(initial=0) <= 1, msg
    assert np.count_nonzero(diff) <= max(2, 0.001 * diff.size), msg


class Jolted:
    """Mixin: at one training step the weights are knocked far off (as a blow-up does), in the rows `rows`."""

    jolt_at, jolt, rows = None, None, slice(None)

    def loss(self, rows, cols, weights=None):
        import torch

        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == self.jolt_at:
            with torch.no_grad():
                for p in self.model.parameters():
                    p[self.rows] = self.jolt(p[self.rows])
        return super().loss(rows, cols, weights)


# How a stage can go wrong: weights thrown far off, or not numbers at all.
JOLTS = {"noise": lambda p: p + 50 * p.abs().mean() * (2 * (p.abs() > p.abs().median()) - 1),
         "nan": lambda p: p * float("nan")}
