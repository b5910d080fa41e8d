import ast
import io
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import DATA, photo
from PIL import Image, UnidentifiedImageError

import pillow_nif


def psnr(a, b, peak=255.0):
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return 10 * np.log10(peak**2 / mse)


@pytest.mark.parametrize("env, expected", [({}, "1000"), ({"GOMP_SPINCOUNT": "5"}, "5"),
                                           ({"OMP_WAIT_POLICY": "ACTIVE"}, "None")])
def test_openmp_threads_spin_briefly_unless_the_user_says_otherwise(env, expected):
    # A long spin made a two-thread encode 80-90x slower on a machine whose other processes kept the cores busy.
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import os, pillow_nif; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_save_open_round_trip(small_nif):
    with Image.open(small_nif) as im:
        assert im.format == "NIF" and im.format_description == "Neural Imaging Format"
        assert im.mode == "RGB" and im.size == (97, 61)
        assert im.get_format_mimetype() == "image/x-nif"
        im.load()
        assert psnr(im, photo(97, 61)) > 20  # a real fit of the photo, not noise
    assert Image.registered_extensions()[".nif"] == "NIF"


def test_file_respects_bpp_ceiling(small_nif):
    assert small_nif.stat().st_size * 8 <= 3.0 * 97 * 61


def test_header_only_open_imports_no_torch(small_nif):
    code = (
        "import sys, pillow_nif; from PIL import Image; im = Image.open(sys.argv[1]); "
        "print(im.size, im.mode, pillow_nif.info(sys.argv[1])['params'] > 0, "
        "[m for m in ('torch', 'triton') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(small_nif)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(97, 61) RGB True []"


def test_save_and_load_do_not_import_torchs_compiler(tmp_path):
    """torch.optim's optimisers import torch._dynamo when built: seconds once per process, which a one-off encode
    (and most of a GPU encode) would pay. The fit's optimisers are written without torch.optim (optim.py). Nor
    sympy, which a module moved off the meta device imports: 0.2 s of a fresh process's decode (model.blank_nif)."""
    code = (
        "import sys, pillow_nif; from PIL import Image; "
        "Image.effect_noise((24, 16), 64).convert('RGB').save(sys.argv[1], bpp=4.0, effort=1); "  # fitted: not flat
        "Image.open(sys.argv[1]).load(); print([m for m in ('torch', 'torch._dynamo', 'sympy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.nif")], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "['torch']"


def test_reading_imports_no_part_of_the_encoder():
    """A viewer that only reads .nif files loads the decoder alone: the trainer's modules (fit.py alone is ~1700
    lines) are for writing."""
    code = (
        "import sys, pillow_nif; from PIL import Image; im = Image.open(sys.argv[1]); im.load(); "
        "im.thumbnail((20, 20)); pillow_nif.decode(sys.argv[1], size=(320, 256)); pillow_nif.info(sys.argv[1]); "
        "print(sorted(m for m in sys.modules if m.startswith('pillow_nif.')))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(DATA / "v8-rgb-160x128.nif")], capture_output=True,
                         text=True, check=True)
    loaded = set(ast.literal_eval(out.stdout))
    assert "pillow_nif.render" in loaded
    assert not loaded & {f"pillow_nif.{m}" for m in ("fit", "batch", "tiles", "optim", "subgrid", "sampling",
                                                     "stepgraph")}


def test_open_from_bytes_and_file_object(small_nif):
    data = small_nif.read_bytes()
    ref = np.asarray(Image.open(small_nif))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), ref)
    with open(small_nif, "rb") as f:
        assert np.array_equal(np.asarray(Image.open(f)), ref)
    assert np.array_equal(np.asarray(pillow_nif.decode(data)), ref)


def test_not_a_nif_is_unidentified(tmp_path):
    p = tmp_path / "model.nif"  # .nif is also a game-model format: the magic decides
    p.write_bytes(b"NetImmerse File Format, Version 4.0.0.2\n" + bytes(200))
    with pytest.raises(UnidentifiedImageError):
        Image.open(p)
    p.write_bytes(b"")
    with pytest.raises(UnidentifiedImageError):
        Image.open(p)


def test_corrupt_weights_raise_a_clear_error_on_load(small_nif, tmp_path):
    data = bytearray(small_nif.read_bytes())
    data[-40] ^= 0x55  # inside the weights chunk
    p = tmp_path / "bad.nif"
    p.write_bytes(bytes(data))
    im = Image.open(p)  # the header is intact: the size is known
    assert im.size == (97, 61)
    with pytest.raises(OSError, match="bad CRC"):
        im.load()
    with pytest.raises(SyntaxError, match="bad CRC"):
        Image.open(p).verify()
    im.close()


def test_truncated_file_raises(small_nif, tmp_path):
    data = small_nif.read_bytes()
    p = tmp_path / "cut.nif"
    for n in (len(data) - 1, len(data) // 2, 60):
        p.write_bytes(data[:n])
        with pytest.raises(OSError, match="truncated"):
            Image.open(p).load()
    p.write_bytes(data + b"\n")  # appended: the message says where
    with pytest.raises(OSError, match="1 byte after the last whole chunk"):
        Image.open(p).load()


def test_verify_passes_on_a_good_file(small_nif):
    with Image.open(small_nif) as im:
        im.verify()


def test_thumbnail_resizes_the_decoded_image(small_nif):
    """No draft(): a smaller rendering costs the stored size's anyway (render.render_file), so thumbnail() gives
    what it gives for the decoded image, a PNG of it say."""
    im = Image.open(small_nif)
    assert im.draft(None, (30, 20)) is None and im.size == (97, 61)
    im.thumbnail((24, 24))
    assert im.size == (24, 15)
    decoded = Image.open(small_nif)
    decoded.load()
    decoded.thumbnail((24, 24))
    assert np.array_equal(np.asarray(im), np.asarray(decoded))


def test_no_resource_warning(small_nif):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        im = Image.open(small_nif)
        im.load()
        assert im.fp is None
        del im


def test_bad_options_fail_before_work_and_leave_no_file(tmp_path):
    im = photo(32, 32)
    for opts in ({"bpp": 0}, {"bpp": -1}, {"effort": 42}, {"device": "tpu"}, {"quality": 0}, {"bpp": float("nan")}):
        p = tmp_path / "x.nif"
        with pytest.raises(ValueError):
            im.save(p, **opts)
        assert not p.exists()


def test_an_interrupted_or_failed_save_leaves_no_empty_file(tmp_path, monkeypatch):
    # Pillow and imageio open the file before the encoder's minutes of fitting; Ctrl-C there, or any error under
    # imageio (which hands Pillow its own file object), had left an empty .nif behind.
    iio = pytest.importorskip("imageio.v3")
    from pillow_nif import fit

    im, arr = photo(32, 32), np.asarray(photo(32, 32))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit, "encode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        im.save(tmp_path / "a.nif", bpp=1)
    with pytest.raises(KeyboardInterrupt):
        iio.imwrite(tmp_path / "b.nif", arr, bpp=1)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="bpp"):
        iio.imwrite(tmp_path / "c.nif", arr, bpp=0)
    with pytest.raises(ValueError, match="needs at least"):
        iio.imwrite(tmp_path / "d.nif", np.asarray(photo(16, 16)), bpp=0.1)
    assert list(tmp_path.iterdir()) == []
    # What the caller wrote to a file of its own is left alone, and so is a file object not on disk.
    with open(tmp_path / "e.nif", "wb") as f:
        f.write(b"mine")
        with pytest.raises(ValueError):
            im.save(f, format="NIF", bpp=0)
    assert (tmp_path / "e.nif").read_bytes() == b"mine"
    with pytest.raises(ValueError):
        im.save(io.BytesIO(), format="NIF", bpp=0)
    # An empty file the caller opened stays too: what it writes after the failure had gone into a deleted file.
    with open(tmp_path / "f.img", "wb") as f:
        with pytest.raises(ValueError):
            im.save(f, format="NIF", bpp=0.01)
        im.save(f, format="PNG")  # the caller's fallback
    with open(tmp_path / "g.nif", "wb") as f:
        with pytest.raises(ValueError):
            iio.imwrite(f, arr, extension=".nif", bpp=0.01)
    assert Image.open(tmp_path / "f.img").format == "PNG" and (tmp_path / "g.nif").exists()


def test_frames_one_file_each(tmp_path):
    # imageio writes a stack with save_all: Pillow had no NIF handler for it and raised KeyError, leaving an empty file
    iio = pytest.importorskip("imageio.v3")
    with pytest.raises(ValueError, match="one image"):
        iio.imwrite(tmp_path / "a.nif", np.zeros((2, 16, 16, 3), np.uint8), bpp=60, effort=1)
    im = photo(16, 16)
    with pytest.raises(ValueError, match="one image"):
        im.save(tmp_path / "b.nif", save_all=True, append_images=[im], bpp=60, effort=1)
    assert list(tmp_path.iterdir()) == []
    im.save(tmp_path / "c.nif", save_all=True, bpp=60, effort=1)  # one frame is one image
    assert Image.open(tmp_path / "c.nif").size == (16, 16)


def test_too_small_budget_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs at least"):
        photo(16, 16).save(tmp_path / "x.nif", bpp=0.1)
    assert not (tmp_path / "x.nif").exists()


@pytest.mark.parametrize("size", [(0, 0), (0, 12), (12, 0)])
def test_an_empty_image_is_refused_as_pillow_refuses_it(tmp_path, size):
    import pillow_nif

    with pytest.raises(ValueError, match="empty image"):  # was a ZeroDivisionError from the architecture's choice
        Image.new("RGB", size).save(tmp_path / "x.nif", bpp=8)
    assert not (tmp_path / "x.nif").exists()
    with pytest.raises(ValueError, match="empty image"):  # before any image of the batch is fitted
        pillow_nif.encode_many([photo(16, 16), Image.new("L", size)], bpp=8, effort=1)


def test_unsupported_mode_is_refused(tmp_path):
    with pytest.raises(OSError, match="cannot write mode CMYK"):
        photo(16, 16).convert("CMYK").save(tmp_path / "x.nif", bpp=8)


def test_quality_sets_the_bpp_from_the_image_and_bpp_wins(tmp_path):
    from pillow_nif.fit import FitConfig, check_options, quality_bpp

    assert check_options(bpp=0.7, quality=10)[0] == 0.7
    im = photo(48, 40)
    p = tmp_path / "q.nif"
    im.save(p, quality=95, effort=1)
    assert 0.9 * quality_bpp(im, 95, {}, "auto", FitConfig()) <= p.stat().st_size * 8 / (48 * 40)
    assert p.stat().st_size * 8 <= quality_bpp(im, 95, {}, "auto", FitConfig()) * 48 * 40
    im.save(p, quality=95, bpp=0.9, effort=1)
    assert p.stat().st_size * 8 <= 0.9 * 48 * 40


def test_imageio_v3_read_write_props_meta(small_nif, tmp_path):
    iio = pytest.importorskip("imageio.v3")
    arr = iio.imread(small_nif)
    assert arr.shape == (61, 97, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr, iio.imread(small_nif.read_bytes()))
    with open(small_nif, "rb") as f:
        assert np.array_equal(arr, iio.imread(f))
    props = iio.improps(small_nif)
    assert props.shape == (61, 97, 3)
    assert isinstance(iio.immeta(small_nif), dict)
    out = tmp_path / "again.nif"
    iio.imwrite(out, arr, bpp=2.5, effort=1)
    assert out.stat().st_size * 8 <= 2.5 * 97 * 61
    assert Image.open(out).format == "NIF"


def test_imageio_legacy_imread(small_nif):
    imageio = pytest.importorskip("imageio.v2")
    assert imageio.imread(small_nif).shape == (61, 97, 3)
