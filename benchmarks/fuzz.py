#!/usr/bin/env python
"""Long-running fuzz driver for the .nif reader: mutated, truncated, spliced and synthesized files.

    OMP_NUM_THREADS=1 python benchmarks/fuzz.py                     # 100000 cases, seed 0
    OMP_NUM_THREADS=1 python benchmarks/fuzz.py --cases 5000 --seed 7 --max-pixels 20480
    OMP_NUM_THREADS=1 python benchmarks/fuzz.py --atheris -- -runs=100000 -max_len=8192   # coverage-guided

Seeds are tiny real files (pillow_nif.encode of 24x16 / 16x16 crops of the test photo, one per mode),
hand-built ones (bitstream.dumps, with modulation networks, metadata and valid entropy-coded streams) and
the golden vectors tests/data/v*.nif. Each case derives one file from them with a random mutation:

  raw        bit flips, byte replacements, insertions, deletions anywhere (mostly stopped by the CRCs)
  truncate   the file cut at a random offset
  payload    a chunk payload mutated (bit flips, byte replacements, "interesting" integers and floats
             written over header fields, coding records and the stream), then its CRC recomputed, so the
             header, width, coding-record and stream checks behind the CRC are what gets exercised
  length     a chunk's length field changed (CRC of the resulting bytes left as is)
  splice     chunks of two files combined, chunks duplicated, dropped, reordered, unknown chunks added
  synth      a file built field by field from random values around every limit of docs/FORMAT.md

and runs it through the four entry points: ``pillow_nif.info``, ``Image.open`` + ``verify()``, and (on
alternate cases) ``Image.open`` + ``load()`` or ``pillow_nif.decode``. Every outcome must be a decode or one of
UnidentifiedImageError, SyntaxError (FormatError), ValueError, OSError, EOFError, DecompressionBombError;
anything else is *unexpected*: the file and its traceback are saved under --out (default
benchmarks/results/fuzz/). Oracles beyond "no other exception": when both decode paths succeed on a file
(checked on every --cross-check-th case) their pixels must be identical; ``info`` and ``verify`` must agree
(both are bitstream.loads), but that verify also refuses a weight stream that does not decode to exactly the header's
tensors; a file whose ``info`` succeeds must open with that size and mode.

Rendering is kept cheap by ``Image.MAX_IMAGE_PIXELS = --max-pixels`` (a mutated width/height then raises
DecompressionBombError) while parsing is complete. Each case is timed; a case slower than --slow seconds is
saved too. A SIGALRM guard (--timeout) turns a hang into a recorded "timeout" outcome. A JSON summary
(cases, wall time, outcomes per entry point, the slowest cases, peak RSS, unexpected findings) is printed
and written to --out/summary.json.

With --atheris (pip install atheris), libFuzzer chooses which inputs to keep by the coverage of pillow_nif's
own modules, and mutates them with the mutations above (a fifth of the time with its own byte mutator);
an unexpected exception or a broken oracle is a crash, saved by libFuzzer (-artifact_prefix).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import pathlib
import random
import resource
import signal
import struct
import sys
import time
import traceback
import warnings
import zlib

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

if "--atheris" in sys.argv:  # coverage of pillow_nif's own code (instrumenting all of torch takes ages)
    import atheris

    with atheris.instrument_imports(include=["pillow_nif"]):
        import pillow_nif.bitstream
        import pillow_nif.entropy
        import pillow_nif.plugin
        import pillow_nif.render  # noqa: F401

import pillow_nif  # noqa: E402
from pillow_nif import bitstream as bs  # noqa: E402
from pillow_nif import entropy  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
PHOTO = ROOT / "examples" / "kodim23-crop.png"
EXPECTED = (UnidentifiedImageError, SyntaxError, ValueError, OSError, EOFError, Image.DecompressionBombError)


class Timeout(BaseException):
    """Raised by the SIGALRM guard (a BaseException, so no except-clause under test swallows it)."""


# ---- seed files ------------------------------------------------------------------------------------


def photo(width, height, mode="RGB"):
    im = Image.open(PHOTO).convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    return im.convert(mode) if mode != "RGB" else im


def encoded_seeds() -> list[bytes]:
    grey16 = Image.fromarray(np.asarray(photo(16, 16, "L")).astype(np.uint16) * 257)
    yy, xx = np.mgrid[0:16, 0:16]
    disc = photo(16, 16, "RGBA")
    disc.putalpha(Image.fromarray(np.where(np.hypot(yy - 8, xx - 8) < 6, 255, 0).astype(np.uint8)))
    return [
        pillow_nif.encode(photo(24, 16), bpp=4, effort=1, exif=b"II*\x00\x08\x00\x00\x00\x00\x00"),
        pillow_nif.encode(photo(24, 16, "L"), bpp=4, effort=1),
        pillow_nif.encode(photo(16, 16, "RGBA"), bpp=4, effort=1),
        pillow_nif.encode(photo(16, 16, "LA"), bpp=6, effort=1),
        pillow_nif.encode(grey16, bpp=6, effort=1),
        pillow_nif.encode(disc, bpp=6, effort=1),  # a fitted alpha: its aEND chunk
    ]


def built_file(arch: bs.Architecture, mode="RGB", colour=0, size=(12, 9), seed=0, metadata=None, qmax=5) -> bytes:
    """A valid file built field by field: random symbols, entropy coded with the real coder."""
    rng = np.random.default_rng(seed)
    shapes = arch.tensor_shapes()
    codings, syms = [], []
    for i, (_, shape) in enumerate(shapes):
        q = 0 if i == 1 else qmax  # one all-zero tensor (qmax 0: nothing in the stream)
        model = bs.MODEL_LAPLACE if i % 2 else bs.MODEL_UNIFORM
        codings.append(bs.TensorCoding(2**-4, q, model, 30000 if model == bs.MODEL_LAPLACE else 0))
        syms.append(rng.integers(-q, q + 1, size=int(np.prod(shape))))
    stream = entropy.encode(syms, codings, arch.sine_layers())
    header = bs.Header(size[0], size[1], mode, colour, arch)
    return bs.dumps(bs.NifFile(header, codings, stream, metadata or {}))


def golden_seeds() -> list[bytes]:
    """The checked-in golden vectors of every version (tests/data/v*.nif), when present."""
    return [p.read_bytes() for p in sorted((ROOT / "tests" / "data").glob("v*.nif"))]


def built_seeds() -> list[bytes]:
    mod = bs.Architecture(3, (6, 4), 2, 1.4, 30.0, (3,), 1, 20.0, 2.0)
    return [
        built_file(mod, "RGB", 1, metadata={"icc_profile": b"icc!", "exif": b"MM\x00*", "xmp": b"<x/>"}),
        built_file(bs.Architecture(4, (5,), 0, 1.0, 10.0, (2, 2), 0, 5.0, 1.0), "RGBA", 1, size=(7, 5), seed=1),
        built_file(bs.Architecture(1, (3, 3, 3), 1, 2.0, 30.0), "I;16", 0, size=(5, 11), seed=2),
        # version 9: 2 x 1 tiles of an RGBA image with blended margins, the image's alpha ends
        bs.dumps_tiled(bs.TiledFile(bs.TileGrid(20, 8, "RGBA", 2, 1, margin=2), [
            built_file(bs.Architecture(4, (5, 3), 2, 1.4, 45.0), "RGBA", 1, size=(12, 8), seed=s) for s in (8, 9)],
            {"exif": b"MM\x00*", "alpha_ends": b"\x28\x05"})),
        built_file(bs.Architecture(2, (4,), 3, 1.2, 30.0, (2,), 2, 30.0, 1.0), "LA", 0, size=(9, 9), seed=3, qmax=300),
    ]


# ---- chunk helpers -----------------------------------------------------------------------------------


def chunk(kind: bytes, payload: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + payload) if crc is None else crc
    return struct.pack(">4sI", kind, len(payload)) + payload + struct.pack(">I", crc & 0xFFFFFFFF)


def split_chunks(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """(signature, [(type, payload)], trailing bytes), leniently (no CRC check)."""
    pos, chunks = 8, []
    while pos + 12 <= len(data):
        kind, length = struct.unpack_from(">4sI", data, pos)
        if pos + 12 + length > len(data):
            break
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return data[:8], chunks, data[pos:]


def join_chunks(sig: bytes, chunks, tail: bytes = b"") -> bytes:
    return sig + b"".join(chunk(k, p) for k, p in chunks) + tail


INTERESTING_U8 = [0, 1, 2, 3, 4, 5, 7, 8, 9, 23, 24, 25, 127, 128, 255]
INTERESTING_U16 = [0, 1, 2, 255, 256, 2047, 2048, 2049, 32767, 32768, 65534, 65535]
INTERESTING_U32 = [0, 1, 2, 255, 4096, 65535, 65536, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 1 << 28,
                   (1 << 31) - 1, 1 << 31, (1 << 32) - 1]
INTERESTING_F32 = [0.0, -0.0, 1.0, -1.0, 1e-45, 1e-30, 0.5, 30.0, 1e5, 999999.9, 1e6, 1e7, 1e29, 1e30, 1e31, 3.4e38,
                   float("inf"), float("-inf"), float("nan")]


def mutate_bytes(rng: random.Random, b: bytes, n: int | None = None) -> bytes:
    b = bytearray(b)
    if not b:
        return bytes([rng.randrange(256)]) if rng.random() < 0.5 else b""
    for _ in range(n or rng.choice([1, 1, 1, 2, 3, 8])):
        op = rng.randrange(9)
        i = rng.randrange(len(b))
        if op <= 2:
            b[i] ^= 1 << rng.randrange(8)
        elif op <= 4:
            b[i] = rng.randrange(256)
        elif op == 5:
            v = rng.choice(INTERESTING_U8)
            b[i] = v
        elif op == 6 and i + 2 <= len(b):
            b[i : i + 2] = struct.pack(">H", rng.choice(INTERESTING_U16))
        elif op == 7 and i + 4 <= len(b):
            b[i : i + 4] = (struct.pack(">I", rng.choice(INTERESTING_U32)) if rng.random() < 0.5
                            else struct.pack(">f", rng.choice(INTERESTING_F32)))
        elif op == 8:
            if rng.random() < 0.5:
                del b[i : i + rng.choice([1, 1, 2, 4, 9])]
            else:
                b[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 4, 9])))
            if not b:
                break
    return bytes(b)


# Field offsets of NHDR (versions 1-3): width 0, height 4, mode 8, colour 9, pe_freqs 10, pe_scale 11, omega 15,
# n 19, widths 20... Version 4's header is varints and bytes (~16 of them): byte-level mutation covers its fields.
def mutate_header_field(rng: random.Random, p: bytes, version: int = 1) -> bytes:
    p = bytearray(p)
    if len(p) < 20 or version >= 4:
        return mutate_bytes(rng, bytes(p))
    which = rng.randrange(8)
    if which == 0:
        p[0:4] = struct.pack(">I", rng.choice(INTERESTING_U32))
    elif which == 1:
        p[4:8] = struct.pack(">I", rng.choice(INTERESTING_U32))
    elif which == 2:
        p[8] = rng.choice([0, 1, 2, 3, 4, 5, 6, 255])
    elif which == 3:
        p[9] = rng.choice([0, 1, 2, 255])
    elif which == 4:
        p[10] = rng.choice(INTERESTING_U8)
    elif which == 5:
        at = rng.choice([11, 15] + ([len(p) - 8, len(p) - 4] if len(p) >= 30 else []))
        p[at : at + 4] = struct.pack(">f", rng.choice(INTERESTING_F32))
    elif which == 6:  # a layer count or a width
        n = p[19]
        if rng.random() < 0.4 or n == 0:
            p[19] = rng.choice(INTERESTING_U8)
        else:
            k = 20 + 2 * rng.randrange(n)
            if k + 2 <= len(p):
                p[k : k + 2] = struct.pack(">H", rng.choice(INTERESTING_U16))
    else:  # grow or shrink the widths lists consistently
        return synth_header(rng)
    return bytes(p)


def record_ends(p: bytes, n_tensors: int, version: int) -> list[int]:
    """Where each coding record ends (version 4's take 4 or 5 bytes: qmax's first byte says which; version 5's
    first one a byte more, the input layer's decay slope)."""
    if version < 4:
        size = 9 if version == 1 else 6
        return [size * (i + 1) for i in range(n_tensors)]
    ends, pos = [], 0
    for i in range(n_tensors):
        pos += (5 if pos + 3 < len(p) and p[pos + 3] & 0x80 else 4) + (version >= 5 and i == 0)
        ends.append(pos)
    return ends


def mutate_weights(rng: random.Random, p: bytes, n_tensors: int, version: int = 1) -> bytes:
    p = bytearray(p)
    size = 9 if version == 1 else 6  # versions 2 and 3: step (bfloat16) qmax param, u16 each
    ends = record_ends(p, n_tensors, version)
    rec = ends[-1] if ends else 0
    which = rng.randrange(6)
    if which <= 2 and n_tensors and rec <= len(p) and version >= 4:  # step (bfloat16), decay index, qmax
        i = rng.randrange(n_tensors)
        k = ([0] + ends)[i]
        sloped = version >= 5 and i == 0  # the record ends in the input layer's slope byte
        field = rng.randrange(4 if sloped else 3)
        if field == 0:
            p[k : k + 2] = struct.pack(">f", rng.choice(INTERESTING_F32))[:2]
        elif field == 1:
            p[k + 2] = rng.choice(INTERESTING_U8)
        elif field == 2:  # qmax: one byte, or two with the top bit set (possibly non-minimal)
            q = rng.choice(INTERESTING_U16)
            p[k + 3 : ends[i] - sloped] = bytes([q & 0xFF]) if rng.random() < 0.5 else struct.pack(">H", q | 0x8000)
        else:
            p[ends[i] - 1] = rng.choice(INTERESTING_U8)
        return bytes(p)
    if which <= 2 and n_tensors and rec <= len(p) and size == 6:
        k = size * rng.randrange(n_tensors)
        field = rng.randrange(3)
        if field == 0 and rng.random() < 0.5:  # a step from the interesting floats, as its bfloat16
            p[k : k + 2] = struct.pack(">f", rng.choice(INTERESTING_F32))[:2]
        else:
            p[k + 2 * field : k + 2 * field + 2] = struct.pack(">H", rng.choice(INTERESTING_U16))
        return bytes(p)
    if which <= 2 and n_tensors and rec <= len(p):
        k = size * rng.randrange(n_tensors)
        field = rng.randrange(4)
        if field == 0:
            p[k : k + 4] = struct.pack(">f", rng.choice(INTERESTING_F32))
        elif field == 1:
            p[k + 4 : k + 6] = struct.pack(">H", rng.choice(INTERESTING_U16))
        elif field == 2:
            p[k + 6] = rng.choice([0, 1, 2, 255])
        else:
            p[k + 7 : k + 9] = struct.pack(">H", rng.choice(INTERESTING_U16))
        return bytes(p)
    if which == 3 and len(p) > rec:  # the stream: flip bits, or cut / extend by whole words
        s = bytearray(p[rec:])
        r = rng.random()
        if r < 0.4:
            s = bytearray(mutate_bytes(rng, bytes(s)))
        elif r < 0.7:
            s = s[: 4 * rng.randrange(len(s) // 4 + 1)]
        else:
            s += bytes(rng.randrange(256) for _ in range(4 * rng.choice([1, 2, 16, 256])))
        return bytes(p[:rec]) + bytes(s)
    return mutate_bytes(rng, bytes(p))


def synth_header(rng: random.Random) -> bytes:
    def pick(choices, lo, hi):
        return rng.choice(choices) if rng.random() < 0.6 else rng.randint(lo, hi)

    if rng.random() < 0.5:  # mostly within the limits, so that the weights and the stream are reached
        n, m = rng.randint(1, 4), rng.choice([0, 0, 1, 2])
        out = struct.pack(">IIBBBff", rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 5), rng.choice([0, 0, 1]),
                          rng.randint(0, 6), rng.choice([1.4, 2.0, 1.0, 0.5, 1e3]), rng.choice([30.0, 1.0, 300.0, 0.0]))
        out += bytes([n]) + b"".join(struct.pack(">H", rng.randint(1, 24)) for _ in range(n))
        out += bytes([m]) + b"".join(struct.pack(">H", rng.randint(1, 8)) for _ in range(m))
        if m:
            out += struct.pack(">Bff", rng.randint(0, 4), rng.choice([30.0, 1.0]), rng.choice([1.0, 10.0]))
        return out

    w = pick([1, 2, 7, 24, 64, 4096, 1 << 20, (1 << 20) + 1, 0], 0, 300)
    h = pick([1, 3, 16, 64, 4096, 1 << 20, 0], 0, 300)
    n = pick([0, 1, 2, 3, 8, 9], 0, 9)
    m = pick([0, 0, 0, 1, 2, 8, 9], 0, 9)
    widths = [pick([1, 2, 4, 8, 64, 2048, 2049, 0], 0, 40) for _ in range(min(n, 12))]
    mwidths = [pick([1, 2, 4, 2048, 0], 0, 10) for _ in range(min(m, 12))]
    out = struct.pack(">IIBBBff", w, h, pick([1, 2, 3, 4, 5, 0, 6], 0, 255), pick([0, 1, 2], 0, 255),
                      pick([0, 1, 2, 8, 24, 25], 0, 255), rng.choice(INTERESTING_F32 + [1.4, 2.0]),
                      rng.choice(INTERESTING_F32 + [30.0] * 5))
    out += bytes([n]) + b"".join(struct.pack(">H", v) for v in widths)
    out += bytes([m]) + b"".join(struct.pack(">H", v) for v in mwidths)
    if m:
        out += struct.pack(">Bff", pick([0, 1, 2, 24, 25], 0, 255), rng.choice(INTERESTING_F32 + [30.0]),
                           rng.choice(INTERESTING_F32 + [1.0]))
    if rng.random() < 0.1:
        out = mutate_bytes(rng, out)
    return out


def synth_file(rng: random.Random) -> bytes:
    header = synth_header(rng)
    try:
        n_tensors = len(bs.parse_header(header, 1).arch.tensor_shapes())
        params = bs.parse_header(header, 1).arch.num_params()
    except bs.FormatError:
        n_tensors, params = rng.randrange(1, 40), rng.randrange(1, 10000)
    def record():
        if rng.random() < 0.97:  # a valid one (every record must be valid for the stream to be reached)
            model = rng.choice([0, 1])
            return struct.pack(">fHBH", rng.choice([0.01, 0.1, 1.0, 1e-30, 1e29, 0.0]),
                               rng.choice([0, 1, 3, 7, 15, 255, 32767]),
                               model, rng.choice([1, 30000, 50000, 65535]) if model else 0)
        return struct.pack(">fHBH", rng.choice(INTERESTING_F32), rng.choice(INTERESTING_U16),
                           rng.choice([0, 1, 2, 255]),
                           rng.choice(INTERESTING_U16))

    records = b"".join(record() for _ in range(n_tensors + rng.choice([0, 0, 0, 0, 0, 0, -1, 1])))
    words = max(0, params // 256 + rng.choice([0, 1, 2, 8, -1]))  # around the 1/8-bit-per-parameter floor
    stream = bytes(rng.randrange(256) for _ in range(4 * min(words, 4096)))
    chunks = [(b"NHDR", header), (b"WGTS", records + stream)]
    if rng.random() < 0.3:
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        chunks.append((rng.choice([b"iCCP", b"eXIf", b"xMPd", b"zzzz"]), junk))
    return join_chunks(bs.MAGIC + b"\x01", chunks)  # the records above have the version-1 layout


def mutate(rng: random.Random, seeds: list[bytes]) -> tuple[str, bytes]:
    data = rng.choice(seeds)
    kind = rng.choices(["raw", "truncate", "payload", "length", "splice", "synth"], [15, 10, 45, 5, 15, 10])[0]
    if kind == "raw":
        return kind, mutate_bytes(rng, data)
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data) + 1)]
    if kind == "synth":
        return kind, synth_file(rng)
    sig, chunks, tail = split_chunks(data)
    if not chunks:  # nothing to work on chunk-wise (a corpus entry of atheris, say)
        return "raw", mutate_bytes(rng, data)
    if kind == "payload":
        i = rng.randrange(len(chunks))
        k, p = chunks[i]
        if k == b"NHDR":
            p = mutate_header_field(rng, p, sig[7] if len(sig) > 7 else 1) if rng.random() < 0.7 else mutate_bytes(rng, p)
        elif k == b"WGTS":
            try:
                n_tensors = len(bs.parse_header(chunks[0][1], sig[7] if len(sig) > 7 else 1).arch.tensor_shapes())
            except bs.FormatError:
                n_tensors = 0
            p = mutate_weights(rng, p, n_tensors, sig[7] if len(sig) > 7 else 1)
        else:
            p = mutate_bytes(rng, p)
        chunks[i] = (k, p)
        if rng.random() < 0.1:  # and sometimes a second chunk or the signature too
            sig = mutate_bytes(rng, sig, 1) if rng.random() < 0.3 else sig
        return kind, join_chunks(sig, chunks, tail)
    if kind == "length":
        out = bytearray(data)
        pos = 8
        for _ in range(rng.randrange(len(chunks))):
            pos += 12 + len(chunks[_][1])
        if pos + 8 <= len(out):
            old = struct.unpack_from(">I", out, pos + 4)[0]
            new = rng.choice([0, old - 1, old + 1, old + 4, old - 4, 1 << 28, (1 << 28) + 1, 0xFFFFFFFF])
            struct.pack_into(">I", out, pos + 4, new & 0xFFFFFFFF)
        return kind, bytes(out)
    # splice
    other = split_chunks(rng.choice(seeds))[1] or chunks
    op = rng.randrange(6)
    if op == 0 and other:  # a chunk of another file in place of ours
        i = rng.randrange(len(chunks))
        j = rng.randrange(len(other))
        chunks[i] = other[j]
    elif op == 1:  # duplicate a chunk
        i = rng.randrange(len(chunks))
        chunks.insert(rng.randrange(len(chunks) + 1), chunks[i])
    elif op == 2 and len(chunks) > 1:  # reorder
        rng.shuffle(chunks)
    elif op == 3:  # drop
        del chunks[rng.randrange(len(chunks))]
    elif op == 4:  # unknown chunk
        kind4 = rng.choice([b"zzzz", b"Zzzz", b"ZZZZ", b"nHDR", b"wgts", b"IHDR", b"1234", b"NH\x00R"])
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(16)))
        chunks.insert(rng.randrange(len(chunks) + 1), (kind4, junk))
    else:  # header of one file, weights of another
        chunks = [c for c in chunks if c[0] != b"WGTS"] + [c for c in other if c[0] == b"WGTS"]
    return "splice", join_chunks(sig, chunks, tail)


# ---- running a case ------------------------------------------------------------------------------------


def _outcome(fn):
    try:
        return "ok", fn()
    except Timeout:
        raise
    except EXPECTED as e:
        return type(e).__name__, str(e)
    except BaseException as e:  # noqa: BLE001 - the point of the exercise
        return "UNEXPECTED:" + type(e).__module__ + "." + type(e).__name__, traceback.format_exc()


def _load(data):
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im).copy()


def _verify(data):
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
        return im.size, im.mode


def _decode(data):
    return np.asarray(pillow_nif.decode(data, device="cpu", backend="torch")).copy()


def run_case(data: bytes, index: int, cross_every: int) -> dict[str, tuple[str, object]]:
    res = {"info": _outcome(lambda: pillow_nif.info(data)), "verify": _outcome(lambda: _verify(data))}
    if index % 2 == 0 or (cross_every and index % cross_every == 1):
        res["load"] = _outcome(lambda: _load(data))
    if index % 2 == 1 or (cross_every and index % cross_every == 0):
        res["decode"] = _outcome(lambda: _decode(data))
    return res


def oracle_problems(res, data) -> list[str]:
    out = []
    (i_status, i_val), (v_status, v_val) = res["info"], res["verify"]
    # verify is info's parse and the weights' entropy decoding: it refuses what info refuses, and beyond that only
    # a weight stream or the pixel limit
    stream_error = v_status == "FormatError" and "corrupt weight stream" in v_val
    if (i_status == "ok") != (v_status == "ok") and not (i_status == "ok" and (
            v_status == "DecompressionBombError" or stream_error)):
        out.append(f"info {i_status} but verify {v_status}")
    if i_status == "ok" and v_status == "ok" and v_val != ((i_val["width"], i_val["height"]), i_val["mode"]):
        out.append(f"info says {i_val['width']}x{i_val['height']} {i_val['mode']}, open says {v_val}")
    if "load" in res and "decode" in res:
        (l_status, l_val), (d_status, d_val) = res["load"], res["decode"]
        if l_status == "ok" and d_status == "ok" and not np.array_equal(l_val, d_val):
            out.append("Image.open+load and pillow_nif.decode give different pixels")
        if (l_status == "ok") != (d_status == "ok"):
            out.append(f"load {l_status} but decode {d_status}")
    for name in ("load", "decode"):  # verify() checks everything decoding depends on
        if v_status == "ok" and name in res and res[name][0] != "ok":
            out.append(f"verify ok but {name} {res[name][0]}")
    for name, (status, _) in res.items():
        if status == "ok" and name in ("load", "decode") and i_status != "ok":
            out.append(f"{name} decoded a file that info refuses ({i_status})")
    return out


def run_atheris(args, seeds, libfuzzer_args) -> int:
    """Coverage-guided: libFuzzer (atheris) picks inputs by coverage of pillow_nif, the mutations are the
    structure-aware ones above (CRCs kept valid), crashes are unexpected exceptions or broken oracles."""
    import tempfile

    import atheris

    corpus = pathlib.Path(args.corpus or tempfile.mkdtemp(prefix="nif-corpus-"))
    corpus.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        (corpus / hashlib.sha1(s).hexdigest()).write_bytes(s)

    def one_input(data: bytes) -> None:
        res = run_case(data, len(data), 0)
        bad = [f"{n}: {s}\n{v}" for n, (s, v) in res.items() if s.startswith("UNEXPECTED")]
        bad += oracle_problems(res, data)
        if bad:
            raise RuntimeError("\n".join(bad))

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.2:
            data = atheris.Mutate(data, max_size)
        else:
            _, data = mutate(rng, [data, data, rng.choice(seeds)] if data[:8] == bs.SIGNATURE else seeds)
        return data[:max_size]

    atheris.Setup([sys.argv[0], *libfuzzer_args, str(corpus)], one_input, custom_mutator=mutator)
    atheris.Fuzz()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-pixels", type=int, default=20480,
                    help="Image.MAX_IMAGE_PIXELS while fuzzing (the largest seed, a golden vector, is 160x128)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds before a case counts as a hang")
    ap.add_argument("--slow", type=float, default=1.0, help="save cases slower than this (seconds)")
    ap.add_argument("--cross-check", type=int, default=10, help="decode both ways every N-th case (0: never)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz"))
    ap.add_argument("--progress", type=int, default=10_000, help="print a progress line every N cases")
    ap.add_argument("--atheris", action="store_true",
                    help="coverage-guided with atheris (pip install atheris); libFuzzer options after --, "
                         "e.g. -- -runs=100000 -max_len=4096 -artifact_prefix=benchmarks/results/fuzz/")
    ap.add_argument("--corpus", help="atheris: corpus directory (default: a temporary one)")
    argv = sys.argv[1:] if argv is None else argv
    libfuzzer_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1)
    t_seed = time.perf_counter()
    seeds = encoded_seeds() + built_seeds() + golden_seeds()
    Image.MAX_IMAGE_PIXELS = args.max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    for s in seeds:  # every seed must decode: otherwise the mutations start from nowhere
        assert pillow_nif.decode(s).size == (pillow_nif.info(s)["width"], pillow_nif.info(s)["height"])
    seed_seconds = time.perf_counter() - t_seed
    if args.atheris:
        return run_atheris(args, seeds, libfuzzer_args)

    def alarm(signum, frame):
        raise Timeout()

    signal.signal(signal.SIGALRM, alarm)
    rng = random.Random(args.seed)
    counts = {name: collections.Counter() for name in ("info", "verify", "load", "decode")}
    by_kind = collections.Counter()
    kind_decoded = collections.Counter()
    slowest: list[tuple[float, str, str]] = []
    findings = []
    times = []
    t0 = time.perf_counter()
    for index in range(args.cases):
        kind, data = mutate(rng, seeds)
        by_kind[kind] += 1
        start = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, args.timeout)
        try:
            res = run_case(data, index, args.cross_check)
            problems = oracle_problems(res, data)
        except Timeout:
            res, problems = {"case": ("timeout", None)}, ["timeout"]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        dt = time.perf_counter() - start
        times.append(dt)
        digest = hashlib.sha1(data).hexdigest()[:16]
        for name, (status, _) in res.items():
            if name in counts:
                counts[name][status] += 1
        if any(status == "ok" for name, (status, _) in res.items() if name in ("load", "decode")):
            kind_decoded[kind] += 1
        unexpected = [(n, s, v) for n, (s, v) in res.items() if s.startswith("UNEXPECTED") or s == "timeout"]
        if unexpected or problems:
            path = out / f"case-{digest}.nif"
            path.write_bytes(data)
            tb = "\n".join(f"{n}: {s}\n{v if isinstance(v, str) else ''}" for n, s, v in unexpected)
            (out / f"case-{digest}.txt").write_text(f"kind: {kind}\nproblems: {problems}\n{tb}")
            findings.append({"case": index, "kind": kind, "file": str(path),
                             "outcomes": {n: s for n, (s, _) in res.items()}, "problems": problems})
        if len(slowest) < 5 or dt > slowest[-1][0]:
            slowest = sorted(slowest + [(dt, digest, kind)], reverse=True)[:5]
            if dt > args.slow:
                (out / f"slow-{digest}.nif").write_bytes(data)
        if args.progress and (index + 1) % args.progress == 0:
            print(f"{index + 1} cases, {time.perf_counter() - t0:.0f} s, {len(findings)} findings, "
                  f"slowest {slowest[0][0]:.3f} s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    times_arr = np.array(times) if times else np.zeros(1)
    summary = {
        "cases": args.cases,
        "seed": args.seed,
        "wall_seconds": round(wall, 1),
        "seed_files": len(seeds),
        "seed_seconds": round(seed_seconds, 1),
        "max_image_pixels": args.max_pixels,
        "cases_per_second": round(args.cases / wall, 1) if wall else None,
        "mutations": dict(by_kind),
        "mutations_that_decoded": dict(kind_decoded),
        "outcomes": {name: dict(c.most_common()) for name, c in counts.items()},
        "case_seconds": {"mean": float(times_arr.mean()), "p50": float(np.percentile(times_arr, 50)),
                         "p99": float(np.percentile(times_arr, 99)), "max": float(times_arr.max())},
        "slowest": [{"seconds": round(t, 4), "sha1_16": d, "kind": k} for t, d, k in slowest],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "findings": findings[:50],
        "findings_total": len(findings),
        "versions": {"python": sys.version.split()[0], "pillow": Image.__version__, "numpy": np.__version__,
                     "torch": torch.__version__, "pillow_nif": pillow_nif.__version__},
    }
    text = json.dumps(summary, indent=2)
    (out / "summary.json").write_text(text + "\n")
    print(text)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
