import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import photo
from PIL import Image

from pillow_nif.cli import main


def test_encode_decode_info(tmp_path, capsys):
    src = tmp_path / "in.png"
    photo(64, 40).save(src)
    out = tmp_path / "out.nif"
    assert main(["encode", str(src), str(out), "--bpp", "3", "--effort", "1", "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "bpp" in line and "PSNR" in line and " s" in line
    assert out.stat().st_size * 8 <= 3 * 64 * 40
    assert not list(tmp_path.glob(".nif-*"))  # the temporary file was renamed away

    png = tmp_path / "back.png"
    assert main(["decode", str(out), str(png)]) == 0
    assert Image.open(png).size == (64, 40)
    big = tmp_path / "big.png"
    assert main(["decode", str(out), str(big), "--size", "128x80"]) == 0
    assert Image.open(big).size == (128, 80)
    for size, want in (("32x", (32, 20)), ("x80", (128, 80)), ("1x", (1, 1))):  # a side by the aspect ratio
        assert main(["decode", str(out), str(big), "--size", size]) == 0
        assert Image.open(big).size == want

    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["width"] == 64 and info["height"] == 40 and info["mode"] == "RGB" and info["bpp"] <= 3


def test_encode_many_into_a_folder(tmp_path):
    paths = []
    for i, size in enumerate([(40, 32), (33, 47)]):
        p = tmp_path / f"img{i}.png"
        photo(*size).save(p)
        paths.append(str(p))
    out = tmp_path / "out"
    assert main(["encode", *paths, "--out-dir", str(out), "--bpp", "4", "--effort", "1", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["img0.nif", "img1.nif"]
    assert Image.open(out / "img1.nif").size == (33, 47)


def test_errors_are_reported_not_raised(tmp_path, capsys):
    bad = tmp_path / "bad.nif"
    bad.write_bytes(b"not a nif at all")
    assert main(["info", str(bad)]) == 1
    assert "not a NIF" in capsys.readouterr().err
    src = tmp_path / "in.png"
    photo(16, 16).save(src)
    assert main(["encode", str(src), str(tmp_path / "x.nif"), "--bpp", "-1"]) == 1
    assert not (tmp_path / "x.nif").exists()
    for size in ("abc", "x", "12x34x5", "-"):
        with pytest.raises(SystemExit):
            main(["decode", str(bad), "out.png", "--size", size])


def test_ctrl_c_is_reported_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    from pillow_nif import fit

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    src = tmp_path / "in.png"
    photo(16, 16).save(src)
    monkeypatch.setattr(fit, "encode_image", interrupted)
    assert main(["encode", str(src), str(tmp_path / "x.nif"), "--bpp", "4", "--quiet"]) == 130
    assert "nif encode: interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_outputs_are_written_as_files_are(tmp_path, monkeypatch):
    # mkstemp's temporary files made every output 0600, and a symlink was replaced by a file
    import os
    import stat

    monkeypatch.chdir(tmp_path)
    photo(16, 16).save("in.png")
    old = os.umask(0o022)
    try:
        assert main(["encode", "in.png", "new.nif", "--bpp", "60", "--effort", "1", "--quiet"]) == 0
        assert stat.S_IMODE(os.stat("new.nif").st_mode) == 0o644
        pathlib.Path("kept.nif").write_bytes(b"old")
        os.chmod("kept.nif", 0o640)
        os.symlink("kept.nif", "link.nif")
        assert main(["encode", "in.png", "link.nif", "--bpp", "60", "--effort", "1", "--quiet"]) == 0
        assert os.path.islink("link.nif") and stat.S_IMODE(os.stat("kept.nif").st_mode) == 0o640
        assert Image.open("kept.nif").size == (16, 16)
        assert main(["decode", "new.nif", "out.png"]) == 0
        assert stat.S_IMODE(os.stat("out.png").st_mode) == 0o644
    finally:
        os.umask(old)
    assert not [p for p in os.listdir() if p.endswith(".tmp")]


def test_outputs_checked_before_any_fitting(tmp_path, capsys, monkeypatch):
    from pillow_nif import fit

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted before the outputs were checked")

    real = fit.encode_image

    monkeypatch.setattr(fit, "encode_image", no_fit)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    photo(16, 16).save("a.png")
    photo(16, 16).save("sub/a.bmp")
    cases = [(["a.png", "sub/a.bmp", "--out-dir", "out"], "both be written to"),  # one over the other, before
             (["a.png", "missing.png", "--out-dir", "out"], "no input file"),
             (["a.png", "sub"], "is a directory"),
             (["a.png", "nowhere/x.nif"], "no folder"),
             (["a.png", "sub/a.bmp"], "is not a .nif name"),  # two inputs meant, one written over: refused
             (["a.png", "--out-dir", "a.png"], "is not a folder")]
    for args, message in cases:
        assert main(["encode", *args, "--bpp", "60", "--quiet"]) == 1
        assert message in capsys.readouterr().err
    monkeypatch.setattr(fit, "encode_image", real)  # the budget's refusal: the encoder's own checks, before fitting
    assert main(["encode", "a.png", "--out-dir", "out", "--bpp", "1", "--quiet"]) == 1
    assert "needs at least" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a.png", "sub"]  # no --out-dir made for a run that failed
    assert Image.open("sub/a.bmp").format == "BMP"


def test_decode_keeps_the_metadata_and_reports_a_bomb(tmp_path, capsys, monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 6
    src = tmp_path / "m.nif"
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    photo(16, 16, "RGBA").save(src, bpp=70, effort=1, exif=exif, icc_profile=b"icc" * 50, xmp=xmp)  # opaque
    for ext in ("jpg", "png", "tif", "webp"):  # an opaque RGBA went to JPEG as "cannot write mode RGBA as JPEG"
        assert main(["decode", str(src), str(tmp_path / f"m.{ext}")]) == 0
        out = Image.open(tmp_path / f"m.{ext}")
        assert out.getexif()[0x0112] == 6 and out.info["icc_profile"] == b"icc" * 50
        assert out.info["xmp"] == xmp  # PNG's and TIFF's were lost
        assert out.mode == ("RGBA" if ext in ("png", "tif") else "RGB")  # libwebp drops an opaque alpha itself
    half = photo(16, 16, "RGBA")
    half.putpixel((0, 0), (0, 0, 0, 0))
    half.save(src, bpp=70, effort=1)
    assert main(["decode", str(src), str(tmp_path / "t.jpg")]) == 1  # a transparency is not dropped silently
    err = capsys.readouterr().err
    assert "RGBA" in err and "to keep its transparency" in err and not (tmp_path / "t.jpg").exists()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert main(["decode", str(src), str(tmp_path / "big.png"), "--size", "3000x3000"]) == 1
    assert "exceeds limit" in capsys.readouterr().err


def test_failed_decode_leaves_no_output(tmp_path):
    bad = tmp_path / "bad.nif"
    bad.write_bytes(b"\x8bNIF\r\n\x1a\x01" + bytes(10))
    assert main(["decode", str(bad), str(tmp_path / "o.png")]) == 1
    assert not (tmp_path / "o.png").exists()
    assert np.array_equal(sorted(p.name for p in tmp_path.iterdir()), ["bad.nif"])


def test_decode_to_a_nif_name_is_refused_not_encoded_again(tmp_path, capsys, monkeypatch):
    from pillow_nif import fit

    def no_fit(*args, **kwargs):
        raise AssertionError("decode fitted a network")

    src = tmp_path / "a.nif"
    photo(16, 16).save(src, bpp=60, effort=1)
    monkeypatch.setattr(fit, "encode_image", no_fit)
    assert main(["decode", str(src), str(tmp_path / "b.NIF")]) == 2
    assert "re-encode with nif encode" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nif"]


def test_usage_errors_exit_2_as_argparses_do(tmp_path, capsys):
    src = tmp_path / "a.png"
    photo(16, 16).save(src)
    for args in (["encode", str(src)], ["encode", str(src), str(src), "c.nif"], ["decode", "x.nif", "o.xyz"]):
        assert main(args) == 2  # were 1, as for a file's error
        assert capsys.readouterr().err.startswith(f"nif {args[0]}: error: ")


def test_a_size_without_pixels_is_a_usage_error(capsys):
    for size in ("0x0", "x0", "-5x"):  # were exit 1, as a file's error, where "foo" was 2
        with pytest.raises(SystemExit) as e:
            main(["decode", "x.nif", "o.png", f"--size={size}"])
        assert e.value.code == 2 and "at least 1 pixel" in capsys.readouterr().err


def test_a_reader_that_goes_away_is_no_error(small_nif):
    """`nif info x.nif | head -1` printed "error: [Errno 32] Broken pipe" and exited 1."""
    p = subprocess.Popen([sys.executable, "-m", "pillow_nif", "info", str(small_nif)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # before the command writes: its write meets a closed pipe
    err = p.stderr.read()
    assert p.wait() == 141 and err == b""


def test_threads_sets_torchs_threads_for_the_command_only(tmp_path, capsys, monkeypatch):
    import types

    import torch

    from pillow_nif import fit

    seen = []

    def fake_fit(im, **opts):  # what a fit would see, without fitting
        seen.append(torch.get_num_threads())
        return types.SimpleNamespace(data=b"nif", bpp=0.1, psnr=30.0, seconds=0.0)

    monkeypatch.setattr(fit, "encode_image", fake_fit)
    before = torch.get_num_threads()
    want = 2 if before == 1 else 1
    src = tmp_path / "a.png"
    photo(16, 16).save(src)
    assert main(["encode", str(src), str(tmp_path / "a.nif"), "--threads", str(want), "--quiet"]) == 0
    assert seen == [want] and torch.get_num_threads() == before
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main(["encode", str(src), str(tmp_path / "b.nif"), "--threads", "0"])
    assert e.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_version_is_the_installed_packages(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    printed = capsys.readouterr().out.split()[-1]
    try:  # pyproject takes its version from pillow_nif.__version__: the two cannot drift apart
        assert printed == metadata.version("pillow-nif")
    except metadata.PackageNotFoundError:
        pytest.skip("pillow-nif is not installed, only on the path")


def test_exact_keeps_the_colours_under_alpha_0(tmp_path):
    """--exact reaches the encoder (one input, and several, fitted together): without it the colours no viewer shows
    are filled, not fitted (imaging.fill_hidden)."""
    import pillow_nif
    from test_modes import _cut_out

    im = _cut_out()[0]
    src = tmp_path / "cut.png"
    im.save(src)
    opts = ["--bpp", "4", "--effort", "1", "--quiet"]
    for flag, exact in (([], False), (["--exact"], True)):
        assert main(["encode", str(src), str(tmp_path / "one.nif"), *flag, *opts]) == 0
        assert (tmp_path / "one.nif").read_bytes() == pillow_nif.encode(im, bpp=4, effort=1, exact=exact)
    (tmp_path / "cut2.png").write_bytes(src.read_bytes())
    two = ["encode", str(src), str(tmp_path / "cut2.png"), "--out-dir", str(tmp_path / "d"), "--exact"]
    assert main([*two, *opts]) == 0
    # The two were fitted as one stack (not byte for byte encode_many's of one), so what shows is how well each
    # kept the noise under the alpha 0: as encode's exact file does, far better than its default one.
    ref = np.asarray(im, dtype=np.float64)[..., :3]
    hidden = np.asarray(im)[..., 3] == 0

    def hidden_error(data):
        return ((np.asarray(pillow_nif.decode(data), dtype=np.float64)[..., :3] - ref) ** 2)[hidden].mean()

    default = hidden_error(pillow_nif.encode(im, bpp=4, effort=1))
    for name in ("cut", "cut2"):
        assert hidden_error((tmp_path / "d" / f"{name}.nif").read_bytes()) < default


def test_python_m_pillow_nif_is_the_nif_command(small_nif):
    out = subprocess.run([sys.executable, "-m", "pillow_nif", "info", str(small_nif)], capture_output=True, text=True)
    assert out.returncode == 0 and (json.loads(out.stdout)["width"], json.loads(out.stdout)["height"]) == (97, 61)
    out = subprocess.run([sys.executable, "-m", "pillow_nif", "decode", str(small_nif)], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: nif decode" in out.stderr
