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
    if mode in ("1", "L", "RGB") and "transparency" in im.info:
        return "RGBA" if mode == "RGB" else "LA"  # a transparent colour (PNG's tRNS) becomes an alpha channel
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
    """`im` with the colours under an alpha of 0 replaced (the `exact=False` default; WebP's lossy mode discards them
    too): a decoder shows none of them, but fitted they cost the visible pixels. A hidden pixel mostly enclosed by
    visible ones (a hole) takes a smooth fill from the colours around it, so the fit sees no new edge there; one in a
    larger hidden area (a cut-out's background) takes one colour, the mean of the visible pixels along the hidden
    ones' rim, since a smooth continuation there gives the fit structure to learn that no one sees; between the two
    they blend by how enclosed the pixel is. Black where nothing is visible. Against fitting what stayed beneath:
    +3.2 dB (premultiplied) on 256x256 Kodak crops behind a feathered ellipse (NOTES.md #209); against the plain
    mean of the visible pixels: +0.14 dB with small holes in photos, +0.55 on flat logos, even on cut-outs
    (#212). The image itself where nothing is hidden; `info` is kept."""
    full = _with_alpha(im)
    if full is None:
        return im
    arr = np.asarray(full)
    visible = arr[..., -1] > 0
    if visible.all():
        return im
    from PIL import Image

    out = arr.copy()
    hidden = np.nonzero(~visible)
    if visible.any():
        rim = visible & _dilate(~visible)
        background = arr[rim, :-1].mean(axis=0)
        share = np.clip(2 * _visible_share(visible, _ENCLOSURE)[hidden] - 1, 0, 1)[:, None]
        fill = background + (_push_pull(arr[..., :-1], visible, hidden) - background) * share
        out[hidden[0], hidden[1], :-1] = np.round(fill).clip(0, 255).astype(np.uint8)
    else:
        out[..., :-1] = 0
    filled = Image.fromarray(out)  # (H, W, 2) is LA, (H, W, 4) RGBA
    filled.info = dict(full.info)
    return filled


# Half the side of the window in which a hidden pixel counts as enclosed: holes up to ~10 pixels across are filled
# from around, wider hidden areas take the rim's mean. Measured at 16 against 8 (#212).
_ENCLOSURE = 16


def _dilate(mask):
    """`mask` grown by one pixel in the 8 directions."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    rows = grown.copy()
    grown[:, 1:] |= rows[:, :-1]
    grown[:, :-1] |= rows[:, 1:]
    return grown


def _visible_share(visible, r):
    """The share of visible pixels among the image's own in the (2r+1)^2 window around each pixel."""

    def box_sum(a):  # int32: counts up to 2^31 pixels
        s = np.zeros((a.shape[0] + 2 * r + 1, a.shape[1] + 2 * r + 1), np.int32)
        s[1:, 1:] = np.pad(a, r).cumsum(0).cumsum(1)
        n = 2 * r + 1
        return s[n:, n:] - s[:-n, n:] - s[n:, :-n] + s[:-n, :-n]

    def counts(n):  # pixels of a side of n inside each window along it
        i = np.arange(n)
        return np.minimum(i + r, n - 1) - np.maximum(i - r, 0) + 1

    h, w = visible.shape
    return box_sum(visible.astype(np.int32)) / np.outer(counts(h), counts(w))


def _halve(a):
    """Sums over 2x2 blocks, an odd edge padded with zeros."""
    h, w = a.shape[:2]
    a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)))
    return a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]


def _enlarged_at(a, ys, xs):
    """`a`, one level up _halve's pyramid, enlarged bilinearly (pixel centres aligned) and read at the pixels
    (ys, xs) below it: index arrays that broadcast."""

    def axis(i, m):
        x = np.clip((i + 0.5) / 2 - 0.5, 0, m - 1)
        lo = np.floor(x).astype(np.intp)
        return lo, np.minimum(lo + 1, m - 1), (x - lo).astype(a.dtype)[..., None]

    y0, y1, fy = axis(ys, a.shape[0])
    x0, x1, fx = axis(xs, a.shape[1])
    return (a[y0, x0] * (1 - fx) + a[y0, x1] * fx) * (1 - fy) + (a[y1, x0] * (1 - fx) + a[y1, x1] * fx) * fy


def _push_pull(colour, known, at):
    """A smooth fill of `colour` (H, W, C) from its `known` pixels, read at the pixels `at` (np.nonzero's pair):
    the mean of the known pixels in the finest block of a 2x2 pyramid that holds any, enlarged bilinearly from the
    coarser levels where a block holds none. Only the pixels asked for are made at full size (a 12-megapixel
    image's fill would otherwise hold several full-size float copies)."""
    weight = known[..., None].astype(np.float32)
    levels = [(_halve(colour * weight), _halve(weight))]
    while max(levels[-1][1].shape[:2]) > 1:
        levels.append((_halve(levels[-1][0]), _halve(levels[-1][1])))
    estimate = None
    for total, weight in reversed(levels):
        mean = total / np.maximum(weight, 1e-12)
        if estimate is not None:
            h, w = weight.shape[:2]
            share = np.minimum(weight, 1)
            mean = mean * share + _enlarged_at(estimate, np.arange(h)[:, None], np.arange(w)) * (1 - share)
        estimate = mean
    return _enlarged_at(estimate, *at)


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
    # the channels give the mode (L, LA, RGB, RGBA): fromarray's mode argument is deprecated from Pillow 11.3
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
