"""The ``nif`` command: ``nif encode``, ``nif decode``, ``nif info``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import secrets
import stat
import sys


def _size(text: str) -> tuple[int | None, int | None]:
    """WIDTHxHEIGHT, or one of them (512x, x256) for the other by the stored aspect ratio."""
    try:
        w, h = (int(v) if v else None for v in text.lower().split("x"))
        if w is None and h is None:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1536x1024, 512x or x256, got {text!r}") from None
    if any(v is not None and v < 1 for v in (w, h)):
        raise argparse.ArgumentTypeError(f"size needs sides of at least 1 pixel, got {text!r}")
    return w, h


def _scaled(size: tuple[int | None, int | None], stored: tuple[int, int]) -> tuple[int, int]:
    """--size with a side left out: that side by the stored aspect ratio (at least one pixel)."""
    (w, h), (sw, sh) = size, stored
    return (w if w is not None else max(1, round(h * sw / sh)), h if h is not None else max(1, round(w * sh / sw)))


def write_atomic(path: str, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: never a partial file at `path`. The file gets the
    permissions an ordinary write would (the umask's for a new file, an existing file's own); through a symlink
    its target is replaced."""
    target = os.path.realpath(path)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None
    # os.open applies the umask to 0o666 as open() does (tempfile.mkstemp's files were 0600)
    tmp = os.path.join(os.path.dirname(target), f".nif-{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if mode is not None:
                os.fchmod(f.fileno(), mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def format_of(path: str) -> str | None:
    """The Pillow format a file name's extension picks (None: none does)."""
    from PIL import Image

    return Image.registered_extensions().get(os.path.splitext(path)[1].lower())


def check_output(path: str) -> None:
    """Fail before minutes of fitting where `path` cannot be written: a directory, or a folder that is not there."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"output {path} is a directory")
    folder = os.path.dirname(os.path.realpath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no folder {folder} to write {path} in")


class UsageError(Exception):
    """A command line that asks for nothing runnable: exit status 2, as argparse's own usage errors."""


THREADS_HELP = "CPU threads (default: torch's, one per core); 1 where other work keeps the cores busy"


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs a whole number, not {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"needs at least 1, not {n}")
    return n


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """torch's CPU threads set to `n` for one command (main may run inside a longer-lived process: tests)."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="nif", description="Neural Imaging Format: encode, decode, inspect .nif files")
    p.add_argument("--version", action="version", version=f"nif (pillow-nif) {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("encode", help="fit a network to an image and write a .nif file")
    e.add_argument("inputs", nargs="+", help="input image(s), any format Pillow reads; with one input, then the output")
    e.add_argument("--out-dir", help="write <name>.nif for every input into this folder")
    e.add_argument("--bpp", type=float, help="bits per pixel of the whole file, a ceiling (default 0.5)")
    e.add_argument("--quality", type=float, help="1..100, JPEG's scale: about a JPEG's PSNR at that quality, "
                   "the bpp following the image (--bpp wins)")
    e.add_argument("--effort", type=int, default=5, help="1..9, encode time against quality (default 5)")
    e.add_argument("--device", default="auto", help="where to fit: auto (CUDA when available), cpu, cuda or cuda:N")
    e.add_argument("--seed", type=int, default=0,
                   help="default 0; the same seed, input, options, device and threads give the same file")
    e.add_argument("--exact", action="store_true",
                   help="keep the colours under an alpha of 0 (by default: holes take the colours around them, "
                        "wider transparent areas the colour of their edge)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--threads", type=_positive, help=THREADS_HELP)

    d = sub.add_parser("decode", help="render a .nif file to an image")
    d.add_argument("input", help="a .nif file")
    d.add_argument("output", help="output image; its extension picks the format (e.g. .png)")
    d.add_argument("--size", type=_size, help="render at WIDTHxHEIGHT (or 512x, x256: the other side by the aspect "
                   "ratio) instead of the stored size; smaller: the stored size resized (bicubic)")
    d.add_argument("--device", default="auto", help="where to render: auto, cpu, cuda or cuda:N")
    d.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="triton: the fused kernels (CUDA); auto: triton on CUDA, torch on the CPU")
    d.add_argument("--threads", type=_positive, help=THREADS_HELP)

    i = sub.add_parser("info", help="print a .nif file's header as JSON")
    i.add_argument("input", help="a .nif file")
    return p


def _encode(args) -> int:
    from PIL import Image

    from .fit import check_options, encode_image

    check_options(args.bpp, args.quality, args.effort, args.device, args.seed)
    if args.out_dir:
        jobs = [(src, os.path.join(args.out_dir, pathlib.Path(src).stem + ".nif")) for src in args.inputs]
        names: dict[str, str] = {}
        for src, dst in jobs:
            if dst in names:  # a.png and b/a.jpg would both write a.nif, one over the other
                raise ValueError(f"{names[dst]} and {src} would both be written to {dst}")
            names[dst] = src
        for src in args.inputs:
            if not os.path.isfile(src):
                raise FileNotFoundError(f"no input file {src}")
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise NotADirectoryError(f"--out-dir {args.out_dir} is not a folder")
    elif len(args.inputs) == 2:
        jobs = [tuple(args.inputs)]
        # `nif encode a.png b.png` meant as two inputs would write NIF bytes over b.png: refuse another format's name
        fmt = format_of(args.inputs[1])
        if fmt not in (None, "NIF"):
            raise ValueError(f"{args.inputs[1]} is not a .nif name (that is {fmt}'s extension): give INPUT "
                             "OUTPUT.nif, or several inputs with --out-dir DIR")
    else:
        raise UsageError("give INPUT OUTPUT, or several inputs with --out-dir DIR")
    for _, dst in jobs:
        if not args.out_dir or os.path.isdir(args.out_dir):  # a new --out-dir is made when its first file is done,
            check_output(dst)                               # so that a run refused before then leaves none
    opts = dict(bpp=args.bpp, quality=args.quality, effort=args.effort, device=args.device, seed=args.seed,
                progress=not args.quiet, exact=args.exact)  # the metadata: each image's own (fit.metadata_of)

    def done(dst, im, result):
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
        write_atomic(dst, result.data)
        print(f"{dst}: {im.width}x{im.height} {len(result.data)} bytes, {result.bpp:.4f} bpp, "
              f"PSNR {result.psnr:.2f} dB, {result.seconds:.1f} s")

    if len(jobs) == 1:
        src, dst = jobs[0]
        with Image.open(src) as im:
            im.load()
            done(dst, im, encode_image(im, **opts))
        return 0
    # Several inputs: fitted together where they share a size and architecture (pillow_nif.batch);
    # each file is written as soon as its group is done.
    from .batch import encode_batch

    images = []
    for src, _ in jobs:
        with Image.open(src) as im:
            im.load()
        images.append(im)
    encode_batch(images, on_result=lambda i, r: done(jobs[i][1], images[i], r), **opts)
    return 0


def _decode(args) -> int:
    import io

    from .bitstream import METADATA, read_header
    from .render import decode, read_bytes

    fmt = format_of(args.output)
    if fmt is None:
        raise UsageError(f"unknown output extension {os.path.splitext(args.output)[1]!r}")
    if fmt == "NIF":  # Pillow would fit a new network to the rendered pixels: minutes, at another file's rate
        raise UsageError(f"{args.output} is a .nif name; decode to an image format (.png, ...), or re-encode with "
                         "nif encode")
    check_output(args.output)
    data, size = read_bytes(args.input), args.size  # read once: a side left out needs the stored size first
    if size is not None and None in size:
        header = read_header(data)  # the header alone: decode parses the whole file
        size = _scaled(size, (header.width, header.height))
    im = decode(data, size=size, device=args.device, backend=args.backend)
    # The metadata the .nif holds goes on where the format takes it (Pillow's savers ignore what they cannot store;
    # PNG's and TIFF's take XMP only as a text chunk or a tag).
    opts = {k: im.info[k] for k in METADATA if im.info.get(k)}
    if "xmp" in opts and fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        opts["pnginfo"] = PngInfo()
        opts["pnginfo"].add_itxt("XML:com.adobe.xmp", opts["xmp"])
    elif "xmp" in opts and fmt == "TIFF":  # tiffinfo replaces the exif option: the EXIF's tags go with it
        from PIL import Image

        opts["tiffinfo"] = Image.Exif()
        if "exif" in opts:
            opts["tiffinfo"].load(opts["exif"])
        opts["tiffinfo"][700] = opts["xmp"]  # TIFF's XMP tag
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt, **opts)
    except OSError as e:  # e.g. RGBA as JPEG: an opaque alpha (a file's aLPH of 255, usually) goes without loss
        if im.mode not in ("LA", "RGBA") or im.getchannel("A").getextrema() != (255, 255):
            keeps = {"LA": "transparency", "RGBA": "transparency", "I;16": "16 bits"}.get(im.mode)
            if keeps and "cannot write mode" in str(e):  # what a user can do about it, not a flattened guess
                raise OSError(f"{e}: decode to .png or .tiff to keep its {keeps}") from e
            raise
        buf = io.BytesIO()
        im.convert(im.mode[:-1]).save(buf, format=fmt, **opts)
    write_atomic(args.output, buf.getvalue())
    print(f"{args.output}: {im.width}x{im.height} {im.mode}")
    return 0


def _info(args) -> int:
    from .render import info

    print(json.dumps(info(args.input), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from PIL.Image import DecompressionBombError

    from .bitstream import FormatError

    try:
        with _torch_threads(getattr(args, "threads", None)):
            status = {"encode": _encode, "decode": _decode, "info": _info}[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not in the interpreter's last flush
        return status
    except UsageError as e:
        print(f"nif {args.command}: error: {e}", file=sys.stderr)
        return 2  # as argparse's own usage errors
    except BrokenPipeError:  # `nif info x.nif | head -1`: the reader is gone, which is no error of ours
        if sys.stdout is sys.__stdout__:  # and the interpreter's last flush must not report it either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a process the signal ended
    except (ValueError, OSError, FormatError, DecompressionBombError) as e:
        print(f"nif {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C in a fit's minutes: no traceback; every file written is whole (write_atomic)
        print(f"\nnif {args.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a process the signal ended


if __name__ == "__main__":
    sys.exit(main())
