"""Pillow plugin for the Neural Imaging Format (.nif), in the order of Pillow's own plugins.

Opening reads the header only (size and mode, no torch); pixels are rendered on ``load()``, at the
stored size. There is no ``draft()``: a smaller image is made from the stored size's samples in any case
(render.render_file), so ``thumbnail()`` resizes the decoded image, as it does any other's.

Save options (``im.save("x.nif", ...)``; each also documented in the README):
    bpp       bits per pixel of the whole file, a ceiling (default 0.5)
    quality   1..100, JPEG's scale: the bpp at which the file is about as close to the image as a JPEG of it at
              that quality, predicted from that JPEG (quality.py); bpp wins if both are given
    effort    1..9, encode time against quality (default 5)
    device    "auto", "cpu", "cuda", "cuda:N"
    seed      integer, for reproducible files
    progress  True for a progress bar, or a callable(done, total)
    icc_profile, exif, xmp   metadata; default: kept from ``im.info``
"""

from __future__ import annotations

import os
import sys

from PIL import Image, ImageFile

from . import bitstream

def _accept(prefix: bytes) -> bool:
    return prefix[: len(bitstream.MAGIC)] == bitstream.MAGIC


class NifImageFile(ImageFile.ImageFile):
    format = "NIF"
    format_description = "Neural Imaging Format"

    def _open(self) -> None:
        assert self.fp is not None
        data = self.fp.read()  # a .nif is small: the whole file, read once
        if not _accept(data):
            raise SyntaxError("not a NIF file")
        self._nif_data = data
        header = bitstream.read_header(data)
        # Image.open checks this size against MAX_IMAGE_PIXELS as _open returns; nothing is allocated before.
        self._size = (header.width, header.height)
        metadata = bitstream.read_metadata(data)
        try:
            self._mode = bitstream.shown_mode(header.mode, metadata)  # + A where the file stores one alpha value
        except bitstream.FormatError:  # damaged after its header: load() names it, as for any other chunk
            self._mode = header.mode
        self.info.update(bitstream.image_info(metadata))

    def verify(self) -> None:
        """Check every chunk's CRC and field, and that each weight stream holds exactly its header's tensors
        (entropy decoded, no torch), without running the network."""
        from .entropy import decode_file

        nif = bitstream.loads(self._nif_data)
        for part in nif.tiles if isinstance(nif, bitstream.TiledFile) else [nif]:
            decode_file(part)
        super().verify()

    def load(self):
        if self._im is None and hasattr(self, "_nif_data"):
            from .imaging import to_image
            from .render import render_file

            try:
                nif = bitstream.loads(self._nif_data)
                # The weight stream is only entropy decoded here: its errors are OSError too, as Pillow's.
                pixels = render_file(nif, None, device=_options["device"], backend=_options["backend"])
            except bitstream.FormatError as e:
                raise OSError(f"cannot decode NIF file: {e}") from e
            self.im = to_image(pixels, nif.header.mode, bitstream.constant_alpha(nif.metadata, nif.header.mode)).im
            if self._exclusive_fp and self.fp:
                self.fp.close()
            self.fp = None
        return super().load()


# Decode options for Image.open (pillow_nif.register(device=..., backend=...) sets them).
_options = {"device": "auto", "backend": "auto"}


def _save(im: Image.Image, fp, filename) -> None:
    info = im.encoderinfo
    opts = dict(
        bpp=info.get("bpp"),
        quality=info.get("quality"),
        effort=info.get("effort", 5),
        device=info.get("device", "auto"),
        seed=info.get("seed", 0),
        progress=info.get("progress", False),
        # None keeps im.info's (fit.metadata_of, which also takes an Image.Exif and text XMP)
        icc_profile=info.get("icc_profile"),
        exif=info.get("exif"),
        xmp=info.get("xmp"),
        exact=info.get("exact", False),  # WebP's name: keep the colours under an alpha of 0
    )
    from .fit import encode_image

    try:
        result = encode_image(im, **opts, measure=False)
    except BaseException as e:
        _discard_empty(fp, filename, pillow_removes=isinstance(e, Exception))
        raise
    fp.write(result.data)
    if hasattr(fp, "flush"):
        fp.flush()


def _save_all(im: Image.Image, fp, filename) -> None:
    """save_all=True (imageio writes a stack of frames so): one frame is saved as ever, more are refused."""
    frames = getattr(im, "n_frames", 1) + len(im.encoderinfo.get("append_images", []))
    if frames > 1:
        _discard_empty(fp, filename, pillow_removes=True)
        raise ValueError(f"a NIF file holds one image, not {frames}: save each frame to a file of its own")
    _save(im, fp, filename)


def _discard_empty(fp, filename, pillow_removes: bool) -> None:
    """Remove the empty file a failed save leaves at `filename` where the save's caller opened it, since the encoder
    writes nothing until its minutes of fitting are done: Pillow's Image.save removes a file it created on an
    Exception, but not on Ctrl-C, and imageio's imwrite, which opens the file ("wb") and hands Pillow the object,
    left one on every error. A file object the user opened is left alone: removing it had sent whatever the user
    wrote to it after the failure (another format's bytes, say) into a deleted file."""
    opener = _opener(fp)
    if opener is None or (opener == "pillow" and pillow_removes):
        return
    try:
        empty = fp.tell() == 0 and os.fstat(fp.fileno()).st_size == 0  # tell(): bytes still in its buffer count
        if not filename or not empty or not os.path.samefile(fp.fileno(), filename):
            return
    except (AttributeError, OSError, ValueError):  # not a file on disk (BytesIO, a pipe), or already closed
        return
    try:
        os.remove(filename)
    except OSError:
        pass


def _opener(fp) -> str | None:
    """"pillow" or "imageio" where the save in progress opened `fp` itself to create a file (read from their frames:
    Image.save's open_fp and created, imageio's request for a file name), else None. Versions that name these
    otherwise give None: an empty file may then be left, never a caller's own file removed."""
    frame = sys._getframe(2)
    while frame is not None:
        module, local = frame.f_globals.get("__name__", ""), frame.f_locals
        if module == "PIL.Image" and frame.f_code.co_name == "save" and local.get("fp") is fp and local.get("open_fp"):
            return "pillow" if local.get("created") else None
        request = getattr(local.get("self"), "_request", None) if module.startswith("imageio.") else None
        if request is not None and getattr(request, "_file", None) is fp:
            from imageio.core.request import URI_FILENAME

            return "imageio" if getattr(request, "_uri_type", None) == URI_FILENAME else None
        frame = frame.f_back
    return None


def register(device: str | None = None, backend: str | None = None) -> None:
    """Register the NIF format with Pillow (done on import); optionally set decode device/backend (ValueError here
    for a name that is neither, not at every later load())."""
    if device is not None:
        from .render import check_device

        check_device(device)
        _options["device"] = device
    if backend is not None:
        from .render import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
        _options["backend"] = backend
    Image.register_open(NifImageFile.format, NifImageFile, _accept)
    Image.register_save(NifImageFile.format, _save)
    Image.register_save_all(NifImageFile.format, _save_all)
    Image.register_extension(NifImageFile.format, ".nif")
    Image.register_mime(NifImageFile.format, "image/x-nif")
