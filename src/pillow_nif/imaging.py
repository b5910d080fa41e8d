"""Pillow modes <-> arrays: which modes NIF stores natively and how the others are converted."""

from __future__ import annotations

import numpy as np

# Stored natively: these keep their mode through a round trip (LA and RGBA with one alpha value as L and RGB).
NATIVE_MODES = ("L", "LA", "RGB", "RGBA", "I;16")
# Converted explicitly (documented): bilevel to grey, palette to RGB(A), premultiplied to straight,
# the 16-bit byte orders and 32-bit integer grey (when its values fit 16 bits) to I;16.
_CONVERT = {"1": "L", "La": "LA", "RGBa": "RGBA", "RGBX": "RGB", "PA": "RGBA",
            "I;16L": "I;16", "I;16B": "I;16", "I;16N": "I;16"}


def as_image(image):
    """What pillow_nif.encode and encode_many take: a PIL image; a path to an image file (opened and read, its
    metadata kept); or an (H, W) / (H, W, 2-4) array of uint8, or (H, W) of uint16, as Image.fromarray reads it."""
    import os

    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            im.load()
        return im
    arr = np.asarray(image)
    try:
        if arr.ndim < 2:
            raise TypeError
        return Image.fromarray(arr)
    except TypeError:  # Pillow's own "Cannot handle this data type: (1, 1, 3), <f4" names neither array nor fix
        raise TypeError(f"cannot encode {type(image).__name__} of {arr.dtype} values in shape {arr.shape}: give a "
                        "PIL image, a file's path, or an array of uint8 ((H, W) or (H, W, 2-4)) or uint16 ((H, W)); "
                        "scale floats to 0-255 and cast them") from None


def storage_mode(im) -> str:
    """The native mode `im` will be stored as, or OSError for modes NIF cannot hold."""
    mode = im.mode
    if mode in NATIVE_MODES:
        return mode
    if mode == "P":
        return "RGBA" if "transparency" in im.info or im.palette.mode == "RGBA" else "RGB"
    if mode in _CONVERT:
        return _CONVERT[mode]
    if mode == "I":
        lo, hi = im.getextrema()
        if lo >= 0 and hi <= 65535:
            return "I;16"
    supported = ", ".join(NATIVE_MODES)
    raise OSError(f"cannot write mode {mode} as NIF (supported: {supported}, and 1, P, PA, La, RGBa, I in 0..65535)")


def split_constant_alpha(im):
    """(`im` without its alpha channel, the alpha's value) where that channel is one value everywhere (an opaque
    RGBA or LA image), else (im, None). The file then stores L or RGB and the value (bitstream.CHUNK_ALPHA), and
    decodes as LA or RGBA again: fitting an opaque alpha cost the colours 0.75-1.4 dB at 0.5 bpp (session 70), though
    the network got its 255s exactly. Pillow's conversions keep `info` (the metadata)."""
    full = _with_alpha(im)
    if full is None:
        return im, None
    lo, hi = full.getchannel("A").getextrema()
    if lo != hi:
        return im, None
    return full.convert(full.mode[:-1]), lo


def _with_alpha(im):
    """`im` in the mode it is stored as where that mode has an alpha channel (LA or RGBA; P, PA, La and RGBa
    converted), else None."""
    mode = storage_mode(im)
    if mode not in ("LA", "RGBA"):
        return None
    return im if im.mode == mode else im.convert(mode)


def fill_hidden(im):
    """`im` with the colours under an alpha of 0 replaced by one colour, the mean of the visible ones (black where
    nothing is visible): a decoder shows none of them, but fitted they cost the visible pixels (the `exact=False`
    default; WebP's lossy mode discards them too). On 256x256 Kodak crops behind a feathered ellipse (59 % hidden,
    0.5-1.0 bpp, efforts 1, 3 and 5) the visible colours, premultiplied, gained 3.2 dB on the mean over fitting the
    photo that stayed beneath, 0.39 over a smooth push-pull fill from the visible pixels around (13 of 15 up), and
    1.6 over black (NOTES.md #209). The image itself where nothing is hidden; `info` is kept."""
    full = _with_alpha(im)
    if full is None:
        return im
    arr = np.asarray(full)
    hidden = arr[..., -1] == 0
    if not hidden.any():
        return im
    from PIL import Image

    out = arr.copy()
    out[hidden, :-1] = np.round(arr[~hidden, :-1].mean(axis=0)) if not hidden.all() else 0
    filled = Image.fromarray(out)  # (H, W, 2) is LA, (H, W, 4) RGBA
    filled.info = dict(full.info)
    return filled


def prepare_image(im) -> tuple[np.ndarray, str, int]:
    """(H, W, C) float64 array in [0, 1], the stored mode, and its peak value (255 or 65535)."""
    mode = storage_mode(im)
    if mode == "I;16":
        if im.mode not in ("I", "I;16"):
            im = im.convert("I")
        arr = np.asarray(im).astype(np.float64)[..., None]
        return arr / 65535.0, mode, 65535
    if im.mode != mode:
        im = im.convert(mode)
    arr = np.asarray(im).astype(np.float64)
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr / 255.0, mode, 255


def to_image(pixels: np.ndarray, mode: str, alpha: int | None = None):
    """PIL image from an (H, W, C) integer array in `mode`'s range; `alpha`: a constant alpha channel to add (an L
    or RGB file's aLPH chunk), which makes it LA or RGBA."""
    from PIL import Image

    if alpha is not None:
        pixels = np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), alpha, pixels.dtype)], axis=2)
        mode += "A"
    if mode == "I;16":
        h, w = pixels.shape[:2]
        return Image.frombytes("I;16", (w, h), np.ascontiguousarray(pixels[..., 0]).astype("<u2").tobytes())
    arr = pixels.astype(np.uint8)
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr, mode)
