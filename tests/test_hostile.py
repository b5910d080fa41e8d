"""Hostile input: mutated, truncated, spliced and synthesized .nif files (property-based, bounded).

Every case must end in a decoded image or in one of the exceptions Pillow's own plugins raise for bad
files (UnidentifiedImageError, SyntaxError, ValueError, OSError, EOFError, DecompressionBombError), through
each entry point: ``Image.open`` + ``load()``, ``Image.open`` + ``verify()``, ``pillow_nif.decode`` and
``pillow_nif.info``. Mutated payloads get their CRCs recomputed so that the checks behind the CRC (header
fields, layer widths, coding records, the entropy-coded stream) are what is exercised.

Cost: Image.MAX_IMAGE_PIXELS is lowered for this module, so a mutated width/height raises
DecompressionBombError instead of rendering a huge image, and every render is watched: its pixel count
must stay within Pillow's limit and its network within what the file's bytes allow (the format's
1/8 bit per parameter floor), so no case evaluates a giant image or network. The long-running version is
benchmarks/fuzz.py.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest import photo
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from PIL import Image, ImageFile, UnidentifiedImageError

import pillow_nif
from pillow_nif import bitstream as bs
from pillow_nif import entropy
from pillow_nif import render as render_mod

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

ALLOWED = (UnidentifiedImageError, SyntaxError, ValueError, OSError, EOFError, Image.DecompressionBombError)
MAX_PIXELS = 4096  # Image.MAX_IMAGE_PIXELS for the fuzz properties: Pillow errors above twice this
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- seed files --------------------------------------------------------------------------------------------


def built_file(arch, mode="RGB", colour=0, size=(12, 9), seed=0, metadata=None, qmax=5, param=30000, slope=0) -> bytes:
    """A valid file built through bitstream.dumps: random symbols, entropy coded with the real coder. A decay
    off version 4's table (30000) makes it a version-3 file; a slope (the input layer's, on a Laplace model)
    version 5; a post-filter (arch.filter_mask) version 6, or 7 where its neighbours are not version 6's first D,
    or 8 where it has classes (arch.filter_thresholds)."""
    rng = np.random.default_rng(seed)
    codings, syms = [], []
    for i, (_, shape) in enumerate(arch.tensor_shapes()):
        q = 0 if i == 1 else qmax  # one all-zero tensor: it takes nothing from the stream
        model = bs.MODEL_LAPLACE if i % 2 or (i == 0 and slope) else bs.MODEL_UNIFORM
        codings.append(bs.TensorCoding(2**-4, q, model, param if model == bs.MODEL_LAPLACE else 0, slope if i == 0 else 0))
        syms.append(rng.integers(-q, q + 1, size=shape))
    header = bs.Header(size[0], size[1], mode, colour, arch)
    return bs.dumps(bs.NifFile(header, codings, entropy.encode(syms, codings, arch.sine_layers()), metadata or {}))


MOD_ARCH = bs.Architecture(3, (6, 4), 2, 1.4, 30.0, (3,), 1, 20.0, 2.0)


@pytest.fixture(scope="session")
def nif_seeds() -> list[bytes]:
    """Tiny real files (the encoder, three modes) and hand-built ones (modulation, metadata, I;16, LA).
    Versions 4 (the encoder's, the modulated one with metadata, LA with 2-byte qmax), 3 (RGBA, I;16), 5 (a
    graded input layer), 6 (a post-filter), 7 (a post-filter on chosen neighbours) and 8 (one with classes)."""
    return [
        pillow_nif.encode(photo(24, 16), bpp=4, effort=1, exif=b"II*\x00\x08\x00\x00\x00\x00\x00"),
        pillow_nif.encode(photo(24, 16, "L"), bpp=4, effort=1),
        pillow_nif.encode(photo(16, 16, "RGBA"), bpp=4, effort=1),
        built_file(MOD_ARCH, "RGB", 1, metadata={"icc_profile": b"icc!", "exif": b"MM\x00*", "xmp": b"<x/>"},
                   param=bs.LAPLACE_PARAMS[60]),
        built_file(bs.Architecture(4, (5,), 0, 1.0, 10.0, (2, 2), 0, 5.0, 1.0), "RGBA", 1, size=(7, 5), seed=1),
        built_file(bs.Architecture(1, (3, 3, 3), 1, 2.0, 30.0), "I;16", 0, size=(5, 11), seed=2),
        built_file(bs.Architecture(2, (4,), 3, 1.2, 30.0, (2,), 2, 30.0, 1.0), "LA", 0, size=(9, 9), seed=3, qmax=300,
                   param=bs.LAPLACE_PARAMS[200]),
        built_file(bs.Architecture(3, (6, 4), 3, 1.4, 45.0), "RGB", 1, size=(10, 6), seed=4, qmax=40,
                   param=bs.LAPLACE_PARAMS[70], slope=-9),
        built_file(bs.Architecture(3, (5, 3), 2, 1.4, 45.0, (2,), 1, 45.0, 10.0, filter_mask=0xFFF), "RGB", 1, size=(9, 7),
                   seed=5, qmax=20, param=bs.LAPLACE_PARAMS[50]),
        built_file(bs.Architecture(3, (4, 3), 2, 1.4, 45.0, filter_mask=1 << 39 | 1 << 13 | 1), "RGB", 1, size=(6, 11),
                   seed=6, qmax=20, param=bs.LAPLACE_PARAMS[50]),  # reaches 4 rows: taller than the image's halves
        built_file(bs.Architecture(3, (4, 3), 2, 1.4, 45.0, filter_mask=0b101, filter_thresholds=(0.0, 0.05, 0.4)),
                   "RGB", 1, size=(8, 6), seed=7, qmax=20, param=bs.LAPLACE_PARAMS[50]),  # 4 classes, one at 0
    ]


N_SEEDS = 11


# ---- the harness: four entry points, bounded cost --------------------------------------------------------

_current = {"size": 0}
_renders = []


def _watched_render(net, width, height, backend="torch", raw=False):
    # What this render may cost: Pillow's pixel limit, and a network the file's bytes pay for.
    macs = sum(w.numel() for w, _ in (*net.mod, *net.genesis, net.out))
    assert width * height <= 2 * Image.MAX_IMAGE_PIXELS, f"rendering {width}x{height}"
    assert macs <= 64 * _current["size"] + 64, f"{macs} multiply-adds per pixel from a {_current['size']}-byte file"
    _renders.append((width * height, macs))
    return _original_render(net, width, height, backend, raw)


_original_render = render_mod.render


@pytest.fixture(scope="module")
def hostile(nif_seeds):
    """The seeds, with a low pixel limit and every render watched (module scope: hypothesis-friendly)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "MAX_IMAGE_PIXELS", MAX_PIXELS)
        mp.setattr(render_mod, "render", _watched_render)
        mp.setattr(pillow_nif.plugin, "_options", {"device": "cpu", "backend": "torch"})
        yield nif_seeds


def _outcome(fn):
    try:
        return "ok", fn()
    except ALLOWED as e:  # anything else propagates and fails the test
        return type(e).__name__, e


def _load(data):
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im).copy()


def _verify(data):
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
        return im.size, im.mode


def check(data: bytes) -> dict:
    """Run every entry point on `data`; allowed exceptions only, and the entry points must agree."""
    _current["size"] = len(data)
    res = {
        "info": _outcome(lambda: pillow_nif.info(data)),
        "verify": _outcome(lambda: _verify(data)),
        "load": _outcome(lambda: _load(data)),
        "decode": _outcome(lambda: np.asarray(pillow_nif.decode(data, device="cpu", backend="torch")).copy()),
    }
    (info, i), (verify, v), (load, px), (decode, dpx) = res["info"], res["verify"], res["load"], res["decode"]
    # info and verify both check every CRC and field (bitstream.loads) and agree, but for the pixel limit and the
    # weight stream, which verify also entropy decodes.
    stream_error = isinstance(v, SyntaxError) and "corrupt weight stream" in str(v)
    if verify != "DecompressionBombError" and not (info == "ok" and stream_error):
        assert (info == "ok") == (verify == "ok"), (info, verify)
    if info == "ok" and verify == "ok":
        assert v == ((i["width"], i["height"]), i["mode"])
    # A file that passes verify() decodes (verify checks all that rendering depends on), and the two decode
    # paths agree on the outcome and on every pixel.
    if verify == "ok":
        assert load == "ok" and decode == "ok", (load, decode)
    assert (load == "ok") == (decode == "ok"), (load, decode)
    if load == "ok":
        assert info == "ok" and np.array_equal(px, dpx)
        assert px.shape[:2] == (i["height"], i["width"])
    else:  # load() failures are OSError (or the pixel limit), as Pillow's plugins raise them
        assert isinstance(px, (OSError, Image.DecompressionBombError)), repr(px)
    try:  # pytest --hypothesis-show-statistics: how deep the cases reach
        event(f"info {info}, load {load}")
    except InvalidArgument:  # not inside a hypothesis test
        pass
    return res


# ---- chunk surgery -----------------------------------------------------------------------------------------


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">4sI", kind, len(payload)) + payload + struct.pack(">I", zlib.crc32(kind + payload))


def split_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    pos, out = 8, []
    while pos + 12 <= len(data):
        kind, length = struct.unpack_from(">4sI", data, pos)
        out.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


V1 = bs.MAGIC + b"\x01"  # the signature of the hand-made records below (version-1 layout)


def join(chunks, signature=V1) -> bytes:
    return signature + b"".join(chunk(k, p) for k, p in chunks)


def with_payload(data: bytes, kind: bytes, payload: bytes) -> bytes:
    return join([(k, payload if k == kind else p) for k, p in split_chunks(data)], data[:8])


U32 = st.one_of(st.sampled_from([0, 1, 2, 64, 4096, 65535, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, (1 << 32) - 1]),
                st.integers(0, (1 << 32) - 1))
U16 = st.one_of(st.sampled_from([0, 1, 2, 2047, 2048, 2049, 32767, 32768, 65535]), st.integers(0, 65535))
U8 = st.one_of(st.sampled_from([0, 1, 2, 5, 6, 8, 9, 24, 25, 255]), st.integers(0, 255))
F32 = st.one_of(st.sampled_from([0.0, -0.0, 1.0, 30.0, 1e-45, 999999.9, 1e6, 1e29, 1e30, 3.4e38]),
                st.floats(width=32, allow_nan=True, allow_infinity=True))
SMALL_WIDTH = st.one_of(st.integers(1, 12), st.sampled_from([0, 2048, 2049, 65535]))


# ---- properties ------------------------------------------------------------------------------------------


@FUZZ
@given(seed=st.integers(0, N_SEEDS - 1),
       edits=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)),
                      min_size=1, max_size=8))
def test_bit_flips_and_byte_edits(hostile, seed, edits):
    check(edited(hostile[seed], edits))


def edited(data: bytes, edits) -> bytes:
    """`data` with each (op, position, value) applied: a bit flipped, a byte set, bytes deleted or inserted."""
    data = bytearray(data)
    for op, pos, value in edits:
        if not data:
            break
        i = pos % len(data)
        if op == 0:
            data[i] ^= 1 << (value % 8)
        elif op == 1:
            data[i] = value
        elif op == 2:
            del data[i : i + 1 + value % 4]
        else:
            data[i:i] = bytes([value]) * (1 + value % 4)
    return bytes(data)


@FUZZ
@given(seed=st.integers(0, N_SEEDS - 1), which=st.integers(0, 10),
       edits=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1 << 16), U32, F32), min_size=1, max_size=4),
       resize=st.integers(-8, 8))
def test_payload_mutations_with_valid_crcs(hostile, seed, which, edits, resize):
    chunks = split_chunks(hostile[seed])
    kind, payload = chunks[which % len(chunks)]
    p = bytearray(payload)
    for op, pos, u, f in edits:
        i = pos % max(1, len(p))
        if op == 0 and p:
            p[i] ^= 1 << (u % 8)
        elif op == 1 and p:
            p[i] = u & 0xFF
        elif op == 2:
            p[i : i + 2] = struct.pack(">H", u & 0xFFFF)
        elif op == 3:
            p[i : i + 4] = struct.pack(">I", u)
        else:
            p[i : i + 4] = struct.pack(">f", f)
    p = p[: len(p) + resize] if resize < 0 else p + bytes(resize)
    check(with_payload(hostile[seed], kind, bytes(p)))


def mostly(valid, wild):
    """`valid` 19 times in 20, else `wild` (a header has some 15 fields: about half the headers are valid)."""
    return st.integers(0, 19).flatmap(lambda k: wild if k == 7 else valid)  # not 0: shrinks to valid


@st.composite
def headers(draw, version=1):
    """NHDR payloads of `version`: each field mostly in range, else drawn from around and beyond its limits."""

    def field(valid, wild):
        return draw(mostly(valid, wild))

    widths = draw(st.lists(mostly(st.integers(1, 12), SMALL_WIDTH), min_size=field(st.just(1), st.just(0)),
                           max_size=field(st.just(4), st.just(10))))
    mod_widths = draw(st.lists(mostly(st.integers(1, 6), SMALL_WIDTH), max_size=field(st.just(3), st.just(10))))
    if version >= 4:  # LEB128 sizes and widths (a wild one may take 4-5 bytes), mode | colour << 4, flags
        out = bs._varint(field(st.integers(1, 40), U32)) + bs._varint(field(st.integers(1, 40), U32))
        mode = (field(st.integers(1, 5), U8) | field(st.integers(0, 1), U8) << 4) & 0xFF
        flags = field(st.integers(0, 15 if version >= 8 else 7 if version >= 6 else 3), U8)
        out += bytes([mode, field(st.integers(0, 4), U8), flags])
        if flags & 1:
            out += struct.pack(">ff", field(st.sampled_from([1.4, 2.0, 0.5]), F32), field(st.just(30.0), F32))
        for ws in (widths, mod_widths):
            out += bytes([field(st.just(len(ws)), U8)]) + b"".join(bs._varint(w) for w in ws)
        if mod_widths or field(st.just(False), st.just(True)):
            out += bytes([field(st.integers(0, 3), U8)])
            if flags & 2:
                out += struct.pack(">ff", field(st.just(30.0), F32), field(st.just(1.0), F32))
        if flags & 4 and version >= 7:  # version 7: the post-filter's neighbours, a 40-bit mask
            out += field(st.integers(1, (1 << 40) - 1), st.integers(0, 4)).to_bytes(5, "little")
        elif flags & 4:  # version 6: the post-filter's size
            out += bytes([field(st.integers(1, 12), U8)])
        if flags & 8:  # version 8: the classes' thresholds (wild ones: NaN, negative, out of order, too many)
            n = field(st.integers(1, 7), U8)
            wild = st.floats(width=32)
            out += bytes([n]) + b"".join(struct.pack("<f", field(st.just(0.1 * k * k), wild)) for k in range(n))
        return out
    out = struct.pack(">II", field(st.integers(1, 40), U32), field(st.integers(1, 40), U32))
    out += bytes([field(st.integers(1, 5), U8), field(st.integers(0, 1), U8), field(st.integers(0, 4), U8)])
    out += struct.pack(">ff", field(st.sampled_from([1.4, 2.0, 0.5]), F32), field(st.sampled_from([30.0, 1.0]), F32))
    out += bytes([field(st.just(len(widths)), U8)]) + b"".join(struct.pack(">H", w) for w in widths)
    out += bytes([field(st.just(len(mod_widths)), U8)]) + b"".join(struct.pack(">H", w) for w in mod_widths)
    if mod_widths or field(st.just(False), st.just(True)):
        out += struct.pack(">Bff", field(st.integers(0, 3), U8), field(st.just(30.0), F32), field(st.just(1.0), F32))
    return out


def record_ends(weights: bytes, n: int, version: int) -> list[int]:
    """Where each of the n coding records ends: 9 or 6 bytes, or version 4's 4 or 5 (qmax's top bit), version
    5's first one a byte (the slope) longer."""
    if version < 4:
        return [(9 if version == 1 else 6) * (i + 1) for i in range(n)]
    ends, pos = [], 0
    for i in range(n):
        pos += (5 if weights[pos + 3] & 0x80 else 4) + (version >= 5 and i == 0)
        ends.append(pos)
    return ends


@st.composite
def records(draw, n, version=1, first=0):
    """n coding records, the first being record `first` of its file, each valid or drawn from anywhere in its
    fields' ranges."""
    out = b""
    for i in range(first, first + n):
        if version >= 4:
            if draw(mostly(st.just(True), st.just(False))):
                step = draw(st.sampled_from([0.05, 1.0, -0.5, 0.0, 1e-30, 9e29]))
                qmax = draw(st.sampled_from([7, 0, 1, 127, 128, 300, 32767]))
                out += struct.pack(">HB", bs._f32_bits(step) >> 16, draw(st.sampled_from([0, 1, 60, 255])))
                out += bytes([qmax]) if qmax < 128 else struct.pack(">H", 0x8000 | qmax)
            else:  # any step and index; qmax's one byte, or two (possibly non-minimal)
                out += struct.pack(">HB", draw(U16), draw(U8))
                out += draw(st.one_of(U8.map(lambda q: bytes([q & 0x7F])), U16.map(lambda q: struct.pack(">H", q | 0x8000))))
        elif draw(mostly(st.just(True), st.just(False))):
            model = draw(st.integers(0, 1))
            step = draw(st.sampled_from([0.05, 1.0, -0.5, 0.0, 1e-30, 9e29]))
            qmax = draw(st.sampled_from([7, 0, 1, 300, 32767]))
            param = draw(st.sampled_from([30000, 1, 65535])) if model else 0
            if version == 1:
                out += struct.pack(">fHBH", step, qmax, model, param)
            else:  # the step as a bfloat16: the upper half of its f32
                out += struct.pack(">HHH", bs._f32_bits(step) >> 16, qmax, param)
        elif version == 1:
            out += struct.pack(">fHBH", draw(F32), draw(U16), draw(U8), draw(U16))
        else:
            out += struct.pack(">HHH", draw(U16), draw(U16), draw(U16))
        if version >= 5 and i == 0:  # the input layer's slope, a signed byte
            out += bytes([draw(mostly(st.sampled_from([0, 0xF7, 0x80, 0x7F]), U8))])
    return out


@FUZZ
@given(seed=st.integers(0, N_SEEDS - 1), data=st.data())
def test_synthesized_headers_and_weights(hostile, seed, data):
    """A drawn header; then either a seed's weights chunk or weights made to match the header's network."""
    version = data.draw(st.sampled_from([v for v in bs.VERSIONS if v != bs.TILED_VERSION]))  # tiles: below
    header = data.draw(headers(version))
    try:
        arch = bs.parse_header(header, version).arch
    except bs.FormatError:
        arch = None
    signature = bs.MAGIC + bytes([version])
    if arch is None or data.draw(st.booleans()):
        weights, signature = split_chunks(hostile[seed])[1][1], hostile[seed][:8]
    else:
        n_tensors = len(arch.tensor_shapes()) + data.draw(st.sampled_from([0, 0, 0, 0, -1, 1]))
        words = max(0, -(-arch.num_params() // 256) + data.draw(st.integers(-1, 2)))
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        stream = rng.integers(0, 256, size=4 * words, dtype=np.uint8).tobytes()
        if words and data.draw(st.booleans()):
            stream = stream[:-1] + b"\x01"  # a valid ANS stream never ends in a zero word
        weights = data.draw(records(max(0, n_tensors), version)) + stream
    check(join([(b"NHDR", header), (b"WGTS", weights)], signature))


@FUZZ
@given(seed=st.integers(0, N_SEEDS - 1), data=st.data())
def test_coding_records(hostile, seed, data):
    """The seed's network and stream under other quantisation steps, ranges, models and parameters."""
    chunks = split_chunks(hostile[seed])
    version = hostile[seed][7]
    n = len(bs.parse_header(chunks[0][1], version).arch.tensor_shapes())
    weights = chunks[1][1]
    ends = record_ends(weights, n, version)
    recs = [weights[a:b] for a, b in zip([0, *ends], ends)]
    for _ in range(data.draw(st.integers(1, 3))):
        k = data.draw(st.integers(0, n - 1))
        recs[k] = data.draw(records(1, version, first=k))
    check(with_payload(hostile[seed], b"WGTS", b"".join(recs) + weights[ends[-1] :]))


@FUZZ
@given(a=st.integers(0, N_SEEDS - 1), b=st.integers(0, N_SEEDS - 1),
       ops=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 100), st.integers(0, 100)), min_size=1, max_size=4))
def test_splices(hostile, a, b, ops):
    """Chunks from two files, duplicated, dropped, reordered, unknown ones inserted."""
    chunks, other = split_chunks(hostile[a]), split_chunks(hostile[b])
    unknown = [(b"zzzz", b"anc"), (b"Zzzz", b""), (b"ZZZZ", b"crit"), (b"nHDR", b""), (b"wgts", b"\x00" * 9)]
    for op, i, j in ops:
        if op == 0 and chunks:
            chunks[i % len(chunks)] = other[j % len(other)]
        elif op == 1 and chunks:
            chunks.insert(j % (len(chunks) + 1), chunks[i % len(chunks)])
        elif op == 2 and chunks:
            del chunks[i % len(chunks)]
        elif op == 3 and len(chunks) > 1:
            k, m = i % len(chunks), j % len(chunks)
            chunks[k], chunks[m] = chunks[m], chunks[k]
        elif op == 4:
            chunks.insert(j % (len(chunks) + 1), unknown[i % len(unknown)])
        else:
            chunks = [c for c in chunks if c[0] != b"WGTS"] + [c for c in other if c[0] == b"WGTS"]
    check(join(chunks, hostile[a][:8]))


# ---- truncation, LOAD_TRUNCATED_IMAGES ------------------------------------------------------------------------


@pytest.mark.parametrize("load_truncated", [False, True])
def test_every_truncation_raises_even_with_load_truncated_images(hostile, monkeypatch, load_truncated):
    """A cut file never yields pixels: LOAD_TRUNCATED_IMAGES does not apply to NIF (a network with missing
    weights has no meaningful partial image), as the README says. The one exception is a cut exactly after
    the weights chunk, which only loses trailing metadata chunks: that file is complete and decodes."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    for data in (hostile[0], hostile[3]):  # encoder-made with EXIF; hand-built with three metadata chunks
        full = _load(data)
        chunks = split_chunks(data)
        ends = np.cumsum([8] + [12 + len(p) for _, p in chunks])
        complete = set(ends[2:].tolist())  # after NHDR + WGTS and after each metadata chunk
        for cut in range(len(data)):
            res = check(data[:cut])
            if cut in complete:
                assert res["load"][0] == "ok" and np.array_equal(res["load"][1], full)
            else:
                assert res["load"][0] in ("OSError", "UnidentifiedImageError"), (cut, res["load"])
                if cut >= 8 + 12 + len(chunks[0][1]):  # the header is whole: Image.open works, load() fails
                    with Image.open(io.BytesIO(data[:cut])) as im:
                        assert im.size == Image.open(io.BytesIO(data)).size
                        with pytest.raises(OSError, match="truncated|missing"):
                            im.load()


# ---- pixel limit ---------------------------------------------------------------------------------------------------


@FUZZ
@given(seed=st.integers(0, N_SEEDS - 1), width=st.one_of(st.integers(1, 128), st.integers(1, 1 << 20)),
       height=st.one_of(st.integers(1, 128), st.integers(1, 1 << 20)))
def test_mutated_size_is_stopped_by_the_pixel_limit(hostile, seed, width, height):
    chunks = split_chunks(hostile[seed])
    header = chunks[0][1]
    if hostile[seed][7] >= 4:  # LEB128 width and height
        r = bs._Reader(header, "header")
        r.varint(3), r.varint(3)
        header = bs._varint(width) + bs._varint(height) + header[r.pos :]
    else:
        header = struct.pack(">II", width, height) + header[8:]
    data = join([(b"NHDR", header)] + chunks[1:], hostile[seed][:8])
    res = check(data)
    assert res["info"][0] == "ok"  # info() renders nothing: it reports any size
    pixels = width * height
    if pixels > 2 * MAX_PIXELS:
        for name in ("verify", "load", "decode"):
            assert res[name][0] == "DecompressionBombError", name
    else:
        assert res["load"][0] == "ok" and res["load"][1].shape[:2] == (height, width)


# ---- verify() needs no network -------------------------------------------------------------------------------------


def test_verify_checks_crcs_without_running_the_network(hostile, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("verify() must not decode the network")

    for name in ("render_file", "load_network", "render"):
        monkeypatch.setattr(render_mod, name, forbidden)
    for data in hostile:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        bad = bytearray(data)
        bad[-5] ^= 0x10  # inside the last chunk's payload
        with Image.open(io.BytesIO(bytes(bad))) as im, pytest.raises(SyntaxError, match="bad CRC"):
            im.verify()


def test_verify_works_with_torch_unimportable(hostile, tmp_path):
    paths = []
    for i, data in enumerate(hostile):
        paths.append(tmp_path / f"{i}.nif")
        paths[-1].write_bytes(data)
    bad = tmp_path / "bad.nif"
    bad.write_bytes(hostile[1][:-1] + bytes([hostile[1][-1] ^ 1]))  # the last CRC byte (of WGTS)
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['triton'] = None\n"
        "import pillow_nif; from PIL import Image\n"
        "for p in sys.argv[2:]:\n"
        "    Image.open(p).verify(); pillow_nif.info(p)\n"
        "try:\n"
        "    Image.open(sys.argv[1]).verify()\n"
        "except SyntaxError as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bad), *map(str, paths)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refused: bad CRC in chunk WGTS"


def test_a_weight_stream_with_words_to_spare_fails_verify_and_load(hostile):
    """The stream must hold exactly the header's tensors (docs/FORMAT.md): a word more, CRC and all intact, is a
    desynchronised decode. info() reads headers and CRCs only, so it passes; verify() and load() refuse it."""
    for data in hostile[:4]:
        weights = split_chunks(data)[1][1]
        bad = with_payload(data, b"WGTS", weights + (0x12345678).to_bytes(4, "little"))
        res = check(bad)
        assert res["info"][0] == "ok"
        assert isinstance(res["verify"][1], SyntaxError) and isinstance(res["load"][1], OSError), res
        with Image.open(io.BytesIO(bad)) as im, pytest.raises(SyntaxError, match="left after the last tensor"):
            im.verify()


# ---- regressions: bugs found by fuzzing and review ---------------------------------------------------------------


def _stream_ending_in_zero_word(data: bytes) -> bytes:
    weights = split_chunks(data)[1][1]
    return with_payload(data, b"WGTS", weights[:-4] + b"\x00\x00\x00\x00")


def test_regression_stream_ending_in_a_zero_word_is_refused_by_verify_and_load(hostile):
    """Was: verify() and info() passed, then load() raised SyntaxError (not OSError) from constriction.
    An ANS stream never ends in a zero word; bitstream.parse_weights now says so, and load() turns any
    error of the weight stream into OSError."""
    data = _stream_ending_in_zero_word(hostile[3])
    with pytest.raises(bs.FormatError, match="zero word"):
        bs.loads(data)
    with Image.open(io.BytesIO(data)) as im, pytest.raises(SyntaxError, match="zero word"):
        im.verify()
    with Image.open(io.BytesIO(data)) as im, pytest.raises(OSError, match="zero word"):
        im.load()
    res = check(data)
    outcomes = [res[k][0] for k in ("info", "verify", "load", "decode")]
    assert outcomes == ["FormatError", "FormatError", "OSError", "FormatError"]


def test_regression_load_reports_weight_stream_errors_as_oserror(hostile, monkeypatch):
    """Errors found only while entropy decoding (past bitstream.loads) are OSError from load(), too."""

    def corrupt(*args, **kwargs):
        raise bs.FormatError("corrupt weight stream: test")

    monkeypatch.setattr(entropy, "decode", corrupt)
    with Image.open(io.BytesIO(hostile[0])) as im, pytest.raises(OSError, match="corrupt weight stream"):
        im.load()


@pytest.mark.parametrize("arch", [
    bs.Architecture(3, (6, 4), 24, 999999.0, 30.0),  # pi * s^23 overflows float32: sin(inf) = NaN everywhere
    bs.Architecture(3, (6, 4), 2, 1.4, 999999.0, (3,), 1, 999999.0, 999999.0),
])
def test_regression_nan_network_output_decodes_to_zero(hostile, arch):
    """Was: NaN outputs went through an undefined float->int cast; now they are 0 (as the Triton clamp)."""
    data = built_file(arch, "RGB", 0, size=(5, 5))
    f = bs.loads(data)
    codings = [bs.TensorCoding(bs.bf16_ceil(9e29), 5, bs.MODEL_UNIFORM, 0)] * len(arch.tensor_shapes())  # and huge weights
    syms = [np.random.default_rng(1).integers(-5, 6, size=shape) for _, shape in arch.tensor_shapes()]
    huge = bs.dumps(bs.NifFile(f.header, codings, entropy.encode(syms, codings, arch.sine_layers())))
    for d in (data, huge):
        a = check(d)["decode"][1]
        assert isinstance(a, np.ndarray) and a.shape == (5, 5, 3)
        assert np.array_equal(a, _load(d))
        if arch.pe_scale > 1e5 or d is huge:
            assert (a == 0).all()


def test_regression_render_memory_is_bounded_for_wide_networks_and_long_rows(hostile, monkeypatch):
    """Was: a band held 16384 pixels x the widest layer (128 MiB per activation for a 3 KB file declaring a
    2048-wide layer; 16 GiB with the GPU band) and a whole row however long (a 2^20 x 1 image: 1 GiB+).
    Now a band holds at most 16384 x 256 activations, split across columns if needed; pixels unchanged."""
    import pillow_nif.model as model

    calls = []
    original = model.evaluate_folded_grid

    def spy(net, ys, xs):
        widest = max(w.shape[1] for w, _ in (*net.mod, *net.genesis))
        calls.append(len(ys) * len(xs) * max(widest, 256))
        return original(net, ys, xs)

    monkeypatch.setattr(model, "evaluate_folded_grid", spy)
    wide = bs.Architecture(3, (1024,), 2, 1.4, 30.0)
    codings = [bs.TensorCoding(0.01, 7, bs.MODEL_LAPLACE, 40000)] * len(wide.tensor_shapes())
    syms = [np.random.default_rng(2).integers(-7, 8, size=shape) for _, shape in wide.tensor_shapes()]
    stream = entropy.encode(syms, codings, wide.sine_layers())
    wide_file = bs.NifFile(bs.Header(64, 96, "RGB", 0, wide), codings, stream)
    net = render_mod.load_network(wide_file)
    banded = _original_render(net, 64, 96)
    assert max(calls) <= (1 << 14) * 256 and len(calls) > 1
    monkeypatch.setattr(render_mod, "_BAND_WIDTH", 1 << 20)  # the old bands: one evaluation
    calls.clear()
    assert np.array_equal(_original_render(net, 64, 96), banded) and len(calls) == 1

    monkeypatch.setattr(render_mod, "_BAND_WIDTH", 256)
    small = render_mod.load_network(bs.loads(hostile[3]))
    calls.clear()
    row = _original_render(small, 40000, 1)
    assert max(calls) <= (1 << 14) * 256 and len(calls) == 3
    monkeypatch.setattr(render_mod, "_CPU_BAND_PIXELS", 1 << 20)  # one piece: the same pixels
    assert np.array_equal(_original_render(small, 40000, 1), row)


def test_seeds_decode_through_every_entry_point(hostile):
    for data in hostile:
        res = check(data)
        assert all(status == "ok" for status, _ in res.values()), {k: v[0] for k, v in res.items()}
    assert _renders  # the watch is in place


# ---- tiled files (version 9) -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiled_seed() -> bytes:
    """A 20x8 RGB image as 2 x 1 tiles with a margin of 2 (extents 12x8), each tile a hand-built file, and EXIF."""
    grid = bs.TileGrid(20, 8, "RGB", 2, 1, margin=2)
    tiles = [built_file(bs.Architecture(3, (5, 3), 2, 1.4, 45.0), "RGB", 1, size=(12, 8), seed=s) for s in (8, 9)]
    return bs.dumps_tiled(bs.TiledFile(grid, tiles, {"exif": b"MM\x00*"}))


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1,
                      max_size=8))
def test_tiled_file_bit_flips_and_byte_edits(hostile, tiled_seed, edits):
    check(edited(tiled_seed, edits))


@FUZZ
@given(grid=st.tuples(U32, U32, U8, U16, U16, U16), which=st.integers(0, 3), cut=st.integers(0, 200),
       inner=st.integers(0, 1 << 16), value=st.integers(0, 255))
def test_tiled_file_grids_and_tiles_with_valid_crcs(hostile, tiled_seed, grid, which, cut, inner, value):
    """A drawn grid over the seed's tiles, or one tile's file cut short or edited (its own CRCs then fail, or not:
    the edit may land where no check looks), every outer CRC valid."""
    chunks = split_chunks(tiled_seed)
    if which == 0:
        chunks[0] = (b"TILE", struct.pack(">IIBHHH", *grid))
    else:
        k = 1 + which % 2
        tile = bytearray(chunks[k][1])
        if which == 3:
            tile[inner % len(tile)] = value
        chunks[k] = (b"TDAT", bytes(tile[: len(tile) - cut % len(tile)] if cut else tile))
    check(join(chunks, tiled_seed[:8]))

