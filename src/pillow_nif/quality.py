"""`quality`: the bpp a quality asks of an image, so that quality means what it means to JPEG's users.

A JPEG's quality sets its quantiser, so its files' sizes follow their content and their quality stays about level
across images; a fixed bpp does the opposite (the 24 Kodak images at 0.5 bpp: 24.7 to 37.5 dB). So quality q asks
for the bpp at which the default effort's file is expected to be as close to the image as a JPEG of it at quality
q (Pillow's, 4:2:0), predicted from that JPEG's own bits: NIF's bits for a given PSNR follow JPEG's for it across
images closely (one power law, `GAIN` and `POWER` below, fitted to the 24 Kodak images' effort-5 files at 0.3 / 0.5
/ 1.0 bpp; `benchmarks/quality_scale.py`). Left out one image at a time, it predicted each file's bits within a
factor of 1.11 (the log's standard deviation), which is ~0.45 dB of PSNR.
"""

from __future__ import annotations

import io
import math

import numpy as np

# payload bpp = GAIN * (the JPEG's entropy-coded bits a pixel) ** POWER, the file's fixed bytes added
# (benchmarks/quality_scale.py calibrate; NOTES.md #236)
GAIN, POWER = 0.6189, 1.0795
# Grey images need more: a grey JPEG spends nothing on colour, where a colour JPEG's 4:2:0 chroma is cheap and NIF's
# colour networks share their weights between the channels. The same six 256x256 crops as L and as RGB, at qualities
# 30 and 60 (effort 5), needed exp(0.137) x the bits the law gives for RGB (sd of the log 0.078; NOTES.md #236).
GREY_GAIN = 1.15
# Quality's bpp is rounded to quarter-octave levels, so that like images of a size keep one architecture and are
# fitted as one stacked network by encode_many (as tiles.RATE_LEVELS); the predictions themselves are ~0.15 octave off.
LEVELS = 4
# The network's bits a pixel never exceed this under quality: NIF's encode time grows with them (768x512 at 1.0 bpp,
# effort 5: 7-10 minutes a core), and past the calibrated 1 bpp (JPEG's quality ~80-90 on photos) the law is an
# extrapolation, which fell short on detailed crops (NOTES.md #236). An image under SMALL_PIXELS may take the bits of
# MAX_BPP over SMALL_PIXELS: its encode costs no more than a 256x256 one's at MAX_BPP.
MAX_BPP = 2.0
# Small images need more bits a pixel than the law gives, for the same PSNR: a network's parameters buy less on fewer
# pixels (its fixed layers, a coarser quantisation of few weights), where a JPEG's 8x8 blocks cost the same at any size.
# The law's bits are multiplied by SMALL_FACTORS, (pixels, factor), interpolated in log pixels: the bits that reached
# the JPEG's PSNR at qualities 30-90 over the law's, on centre crops of six Kodak images (RGB) 16, 32, 64 and 128 pixels
# a side (the geometric mean of each size's 21-24 points; `benchmarks/quality_scale.py sizes`; NOTES.md #246), and 1
# from 256x256 up, where the law held (#236).
SMALL_PIXELS = 256 * 256
SMALL_FACTORS = ((16 * 16, 4.54), (32 * 32, 3.27), (64 * 64, 2.13), (128 * 128, 1.25), (SMALL_PIXELS, 1.0))
_BLOCK = 4096  # the JPEGs of a large image are coded in blocks of this side (JPEG's own limit is 65 500)


def jpegs(im, quality: int, optimize: bool = False):
    """(block, its JPEG's bytes) for `im` (8-bit L or RGB) coded at `quality` in blocks of at most _BLOCK pixels a
    side, in raster order: a JPEG's side is at most 65 500 pixels, and blocks at multiples of 16 change no pixel's
    coding. The blocks carry no `info` (Pillow's JPEG writer takes a comment or XMP from it, and refuses one over
    64 KB)."""
    for y in range(0, im.height, _BLOCK):
        for x in range(0, im.width, _BLOCK):
            block = im.crop((x, y, min(x + _BLOCK, im.width), min(y + _BLOCK, im.height)))
            block.info = {}
            buf = io.BytesIO()
            block.save(buf, "JPEG", quality=quality, optimize=optimize)
            yield block, buf.getvalue()


def jpeg_bits(planes, quality: int) -> int:
    """Bits of the entropy-coded data (no headers, so that small images are not dominated by them) of JPEGs at
    `quality` (optimised Huffman tables) of 8-bit PIL images (L or RGB), summed over `planes` and their blocks."""
    return sum(8 * _scan_bytes(data) for im in planes for _, data in jpegs(im, quality, optimize=True))


def _scan_bytes(jpeg: bytes) -> int:
    """Bytes after the header of a baseline JPEG's one scan (its SOS segment), the end marker included."""
    i = 2  # after SOI
    while i + 4 <= len(jpeg):
        marker, length = jpeg[i + 1], int.from_bytes(jpeg[i + 2 : i + 4], "big")
        if marker == 0xDA:
            return len(jpeg) - (i + 2 + length)
        i += 2 + length
    raise ValueError("no scan in the JPEG")  # cannot happen with Pillow's writer


def planes(im) -> list:
    """The 8-bit images the JPEG measure codes for an image as NIF stores it: its colours (L or RGB; a 16-bit grey
    image by its 8 highest bits in use, so that 10- or 12-bit data, or 8-bit data in I;16, is measured at its own
    detail) and, where it has one, its alpha as L."""
    from PIL import Image

    from .imaging import storage_mode

    mode = storage_mode(im)
    if mode == "I;16":
        if im.mode not in ("I", "I;16"):
            im = im.convert("I")
        values = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
        shift = max(0, int(values.max(initial=0)).bit_length() - 8)
        return [Image.fromarray((values >> shift).astype(np.uint8))]
    if im.mode != mode:
        im = im.convert(mode)
    if mode in ("LA", "RGBA"):
        *colours, alpha = im.split()
        return [Image.merge(mode[:-1], colours), alpha]
    return [im]


def payload_bpp(im, quality: float) -> float:
    """The bits a pixel that quality asks for the network of `im` (beyond the file's fixed bytes), at a
    quarter-octave level and at most max_bpp."""
    w, h = im.size
    coded = planes(im)
    gain = GAIN * (GREY_GAIN if coded[0].mode == "L" else 1.0)
    bpp = gain * (jpeg_bits(coded, round(quality)) / (w * h)) ** POWER * small_factor(w * h)
    if bpp <= 0:  # no entropy-coded bits (cannot happen: a scan has at least a byte)
        return 2.0 ** -10
    return min(max_bpp(w, h), 2.0 ** (round(LEVELS * math.log2(bpp)) / LEVELS))


def small_factor(pixels: int) -> float:
    """SMALL_FACTORS at `pixels`, interpolated in log pixels (the smallest's below 16x16, 1 from SMALL_PIXELS up)."""
    x, y = zip(*SMALL_FACTORS)
    return float(np.interp(math.log(max(pixels, 1)), np.log(x), y))


def max_bpp(w: int, h: int) -> float:
    """The most bits a pixel quality gives a w x h image's network: MAX_BPP, or under SMALL_PIXELS, MAX_BPP's bits
    over SMALL_PIXELS (fit.plan_encode caps them again at the pixels' own)."""
    return MAX_BPP * max(1.0, SMALL_PIXELS / max(w * h, 1))
