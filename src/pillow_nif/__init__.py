"""pillow-nif: the Neural Imaging Format as a Pillow and imageio plugin.

``import pillow_nif`` registers the format with Pillow (and with imageio when it is imported) and
loads neither torch nor triton: they are imported when pixels are first encoded or decoded.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

# torch's CPU threads are OpenMP's (libgomp), whose idle threads spin 300 000 times before they sleep. Where other
# processes keep the cores busy, a spinning thread holds the core that the thread it waits for needs: an encode's
# steps ran 80-90x slower (1.6 steps/s against 130 with a spin of 1000, session 70), while on an idle machine the
# short spin cost 1-4 %. libgomp reads this when torch loads it, so it applies where pillow_nif is imported before
# torch (and in child processes); a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from . import plugin
from .bitstream import FormatError

__version__ = "0.1.0"


def register(device: str | None = None, backend: str | None = None) -> None:
    """Register NIF with Pillow and imageio; `device`/`backend` set how Image.open decodes."""
    plugin.register(device, backend)
    if "imageio.config" in sys.modules:
        _register_imageio()


def encode(image, **options) -> bytes:
    """Fit a NIF network to a PIL image (or a file's path, or an array) and return the .nif file's bytes.

    Options: bpp, quality, effort, device, seed, progress, icc_profile, exif, xmp, exact (see the README).
    """
    from .fit import encode_image
    from .imaging import as_image

    return encode_image(as_image(image), **options, measure=False).data


def encode_many(images, **options) -> list[bytes]:
    """Encode several images (each as encode takes it) with the same options: images of one size and architecture
    are fitted together as one stacked network (see pillow_nif.batch), each to the file encode would write. `bpp`
    may also be one per image (a list or 1-D array; an entry None takes quality's bpp, or the default)."""
    from .batch import encode_many as _encode_many

    return _encode_many(images, **options)


def decode(data_or_path, size=None, device: str = "auto", backend: str = "auto"):
    """Decode a .nif (bytes, path or file object) to a PIL image, optionally at `size` = (w, h)."""
    from .render import decode as _decode

    return _decode(data_or_path, size=size, device=device, backend=backend)


def info(data_or_path) -> dict:
    """Header facts (size, mode, architecture, bpp, metadata keys) without decoding pixels."""
    from .render import info as _info

    return _info(data_or_path)


def _register_imageio(config=None) -> None:
    """Tell imageio that .nif files are read and written by its Pillow plugin."""
    if config is None:
        config = sys.modules["imageio.config"]

    if ".nif" in config.known_extensions:
        return
    ext = config.FileExtension(
        name="Neural Imaging Format",
        extension=".nif",
        priority=["pillow"],
        external_link="https://github.com/aegroto/nif",
    )
    config.extension_list.append(ext)
    config.known_extensions.setdefault(".nif", []).append(ext)


class _ImageioHook(importlib.abc.MetaPathFinder):
    """Registers .nif with imageio right after imageio.config is imported (imageio stays optional)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "imageio.config":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register_imageio(module)

        spec.loader.exec_module = exec_and_register
        return spec


plugin.register()
if "imageio.config" in sys.modules:
    _register_imageio()
else:
    sys.meta_path.insert(0, _ImageioHook())

__all__ = ["FormatError", "decode", "encode", "encode_many", "info", "register", "__version__"]
