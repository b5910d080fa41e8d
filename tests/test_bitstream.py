import dataclasses
import struct
import zlib

import numpy as np
import pytest

from pillow_nif import bitstream as bs
from pillow_nif.bitstream import Architecture, FormatError, Header, NifFile, TensorCoding

ARCH = Architecture(3, (12, 6), 4, 1.4, 30.0, (8,), 2, 30.0, 10.0)
PARAM = bs.LAPLACE_PARAMS[40]  # a decay version 4's table holds


def make_file(arch=ARCH, metadata=None, stream=b"\x01\x00\x00\x00" * 64, step=2**-7, version=bs.VERSION,
              param=PARAM, width=97, slope=0) -> bytes:
    codings = [TensorCoding(step, 7, bs.MODEL_LAPLACE, param, slope if i == 0 else 0) for i in range(len(arch.tensor_shapes()))]
    return bs.dumps(NifFile(Header(width, 61, "RGB", bs.COLOUR_YCBCR, arch), codings, stream, metadata or {}, version))


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">4sI", kind, len(payload)) + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_round_trip_keeps_every_field():
    data = make_file(metadata={"icc_profile": b"icc", "exif": b"II*\x00", "xmp": b"<x/>"})
    f = bs.loads(data)
    assert f.header == Header(97, 61, "RGB", bs.COLOUR_YCBCR, ARCH)
    assert f.codings[0] == TensorCoding(2**-7, 7, bs.MODEL_LAPLACE, PARAM)
    assert f.metadata == {"icc_profile": b"icc", "exif": b"II*\x00", "xmp": b"<x/>"}
    assert bs.read_header(data) == f.header
    assert f.version == 4


def test_codings_version_2_cannot_hold_are_written_as_version_1_exactly():
    v2 = make_file(version=2, param=40000)
    v1 = make_file(step=0.01, version=2, param=40000)  # not a bfloat16
    assert v1[7] == 1 and v2[7] == 2 and make_file(version=3, param=40000)[8:] == v2[8:]
    with pytest.raises(ValueError, match="versions 3 to 5 need"):  # their stream cannot go into version 1
        make_file(step=0.01)
    assert len(v1) - len(v2) == 3 * len(ARCH.tensor_shapes())  # 9-byte records against 6-byte ones
    f = bs.loads(v1)
    assert f.version == 1 and f.codings[0] == TensorCoding(0.01, 7, bs.MODEL_LAPLACE, 40000)
    uniform = TensorCoding(0.5, 3, bs.MODEL_UNIFORM, 0)
    f = NifFile(Header(9, 9, "L", 0, Architecture(1, (4,), 1, 1.4, 30.0)), [uniform] * 4, b"\x01\x00\x00\x00", version=2)
    assert bs.loads(bs.dumps(f)).codings == [uniform] * 4 and bs.dumps(f)[7] == 2


def test_bf16_ceil_rounds_up_to_the_version_2_grid():
    for v in (1e-5, 0.01, 0.3, 1.0, 7.77, 9e29):
        s = bs.bf16_ceil(v)
        assert s >= bs._f32(v) and s < v * (1 + 2**-7) and bs.bf16_ceil(s) == s
        assert struct.pack(">f", s)[2:] == b"\x00\x00"


def test_version_2_step_out_of_range_is_refused():
    data = make_file()
    start = data.index(b"WGTS")  # type, then length, then payload
    (length,) = struct.unpack(">I", data[start + 4 : start + 8])
    payload = b"\x7f\x80" + data[start + 10 : start + 8 + length]  # the first step: +inf as a bfloat16
    with pytest.raises(FormatError, match="out of range"):
        bs.loads(data[:start] + chunk(b"WGTS", payload) + data[start + 12 + length :])


def test_signature_and_version():
    arch = dataclasses.replace(ARCH, filter_mask=1 << 39 | 1, filter_thresholds=(0.5,))  # a version-8 filter
    data = make_file(arch=arch, slope=-12)
    assert data.startswith(bs.MAGIC + bytes([bs.VERSION]))
    with pytest.raises(FormatError, match="not a NIF"):
        bs.loads(b"\x89PNG\r\n\x1a\n" + data[8:])
    with pytest.raises(FormatError, match="unsupported NIF version 10"):
        bs.loads(bs.MAGIC + b"\x0a" + data[8:])
    with pytest.raises(FormatError, match="the first chunk of a tiled file must be its tile grid"):
        bs.loads(bs.MAGIC + b"\x09" + data[8:])  # version 9: tiles (test_tiles.py)


def test_bad_crc_is_named():
    data = bytearray(make_file())
    data[30] ^= 0xFF
    with pytest.raises(FormatError, match="bad CRC"):
        bs.loads(bytes(data))


@pytest.mark.parametrize("cut", [1, 5, 9, 20, 60, -1])
def test_truncation_is_detected(cut):
    data = make_file()
    with pytest.raises(FormatError, match="truncated|missing"):
        bs.loads(data[: cut if cut > 0 else len(data) + cut])


def test_unknown_ancillary_chunk_is_skipped_and_unknown_critical_refused():
    data = make_file()
    assert bs.loads(data + chunk(b"zzZz", b"hello")).header.width == 97
    with pytest.raises(FormatError, match="unknown critical chunk"):
        bs.loads(data + chunk(b"ZZZZ", b"hello"))


def test_an_alpha_chunk_is_one_byte_in_an_l_or_rgb_file():
    data = make_file()
    f = bs.loads(data + chunk(bs.CHUNK_ALPHA, b"\x80"))
    assert bs.constant_alpha(f.metadata, "RGB") == 128 and bs.shown_mode("RGB", f.metadata) == "RGBA"
    assert bs.shown_mode("RGB", bs.loads(data).metadata) == "RGB"
    for payload in (b"", b"\xff\xff"):
        with pytest.raises(FormatError, match="bad alpha chunk"):
            bs.loads(data + chunk(bs.CHUNK_ALPHA, payload))
    arch4 = dataclasses.replace(ARCH, channels=4)
    rgba = bs.dumps(NifFile(Header(97, 61, "RGBA", bs.COLOUR_YCBCR, arch4), bs.loads(make_file(arch4)).codings,
                            b"\x01\x00\x00\x00" * 64))
    with pytest.raises(FormatError, match="bad alpha chunk"):  # an alpha channel twice
        bs.loads(rgba + chunk(bs.CHUNK_ALPHA, b"\xff"))


def test_header_must_come_first_and_once():
    data = make_file()
    first = data[8 : 8 + 12 + struct.unpack(">I", data[12:16])[0]]
    with pytest.raises(FormatError, match="duplicate header"):
        bs.loads(data + first)
    with pytest.raises(FormatError, match="first chunk"):
        bs.loads(data[:8] + chunk(b"zzzz", b"") + data[8:])


def test_hostile_sizes_are_refused_before_allocation():
    huge = Architecture(3, (2048,) * 8, 24, 1.4, 30.0)
    with pytest.raises(FormatError, match="too large"):
        bs.loads(make_file(arch=huge))
    # A plausible architecture but far too many parameters for the bytes present.
    big = Architecture(3, (1024, 1024), 16, 1.4, 30.0)
    with pytest.raises(FormatError, match="too large for the data"):
        bs.loads(make_file(arch=big, stream=b"\x01\x00\x00\x00"))
    with pytest.raises(FormatError, match="width out of range"):
        bs.loads(make_file(arch=Architecture(3, (0,), 4, 1.4, 30.0)))
    nan = Architecture(3, (8,), 4, float("nan"), 30.0)
    with pytest.raises(FormatError, match="hyperparameter"):
        bs.loads(make_file(arch=nan))


def test_zero_image_size_is_refused():
    with pytest.raises(FormatError, match="image size"):
        bs.loads(make_file(width=0))
    data = bytearray(make_file(version=3))
    payload_at = 8 + 8
    data[payload_at : payload_at + 4] = b"\x00\x00\x00\x00"  # width 0 (CRC then fixed below)
    length = struct.unpack(">I", data[12:16])[0]
    payload = bytes(data[payload_at : payload_at + length])
    data[payload_at + length : payload_at + length + 4] = struct.pack(">I", zlib.crc32(b"NHDR" + payload))
    with pytest.raises(FormatError, match="image size"):
        bs.loads(bytes(data))


def test_tensor_shapes_follow_architecture():
    shapes = dict(ARCH.tensor_shapes())
    assert shapes["genesis.0.weight"] == (12, ARCH.pe_dim)
    assert shapes["genesis.2.weight"] == (3, 6)
    assert shapes["modulation.1.weight"] == (1, 8)
    assert ARCH.num_params() == sum(int.__mul__(*s) if len(s) == 2 else s[0] for s in shapes.values())


def _payload(data: bytes, kind: bytes) -> bytes:
    start = data.index(kind)
    (length,) = struct.unpack(">I", data[start + 4 : start + 8])
    return data[start + 8 : start + 8 + length]


def _with_payload(data: bytes, kind: bytes, payload: bytes) -> bytes:
    start = data.index(kind)
    (length,) = struct.unpack(">I", data[start + 4 : start + 8])
    return data[:start] + chunk(kind, payload) + data[start + 12 + length :]


def test_version_4_header_leaves_out_the_encoders_hyperparameters_and_keeps_any_others():
    default = Architecture(3, (70, 32, 18, 18), 11, *bs.DEFAULT_PE, (16, 8), 4, *bs.DEFAULT_MOD)
    plain = Architecture(3, (47, 23, 12), 10, *bs.DEFAULT_PE)
    odd = Architecture(3, (300, 4), 0, 1.25, 30.0, (1,), 0, 20.0, 2.0)
    sizes = {}
    for arch in (default, plain, odd, ARCH):
        data = make_file(arch=arch, width=(1 << 20))
        assert data[7] == 4 and bs.loads(data).header.arch == arch and bs.read_header(data).arch == arch
        v3 = make_file(arch=arch, width=(1 << 20), version=3)
        assert bs.loads(v3).header == bs.loads(data).header and bs.loads(v3).stream == bs.loads(data).stream
        sizes[arch] = len(_payload(data, b"NHDR")), len(_payload(v3, b"NHDR"))
    # width 3 + height 1 + mode, frequencies, flags; then the widths' count and LEB128 values
    assert sizes[default] == (3 + 1 + 3 + 1 + 4 + 1 + 2 + 1, 42)
    assert sizes[plain] == (3 + 1 + 3 + 1 + 3 + 1, 27)
    assert sizes[odd][0] == 3 + 1 + 3 + 8 + 1 + 3 + 1 + 1 + 1 + 8  # both pairs of floats stored


def test_version_4_records_take_4_or_5_bytes_and_name_the_decay_by_index():
    arch = Architecture(1, (3,), 0, 1.0, 30.0)  # two tensors of 2-3 values: (3 x 2) and (1 x 3) weights
    stream = b"\x01\x00\x00\x00" * 4
    for qmax, size in ((0, 4), (127, 4), (128, 5), (bs.MAX_QMAX, 5)):
        for model, param in ((bs.MODEL_UNIFORM, 0), (bs.MODEL_LAPLACE, bs.LAPLACE_PARAMS[1]),
                             (bs.MODEL_LAPLACE, bs.LAPLACE_PARAMS[255])):
            c = TensorCoding(2**-5, qmax, model, param)
            data = bs.dumps(NifFile(Header(3, 2, "L", 0, arch), [c] * 4, stream))
            assert data[7] == 4 and len(_payload(data, b"WGTS")) == 4 * size + len(stream)
            assert bs.loads(data).codings == [c] * 4
    # 1 - r = 2^(-p/16) on the 1/65536 grid, increasing, in integers only
    p = np.arange(1, 256)
    assert np.all(np.abs(65536 - np.array(bs.LAPLACE_PARAMS[1:]) - 65536 * 2.0 ** (-p / 16)) <= 1)
    assert list(bs.LAPLACE_PARAMS) == sorted(bs.LAPLACE_PARAMS) and bs.LAPLACE_PARAMS[:2] == (0, 2779)
    off = make_file(param=40000)  # a decay off the table: the same stream as version 3
    assert off[7] == 3 and bs.loads(off).codings[0].param == 40000


@pytest.mark.parametrize("edit, message", [
    (lambda h: b"\x80\x00" + h[3:], "non-minimal integer"),  # the width as 0x80 0x00: zero, padded
    (lambda h: b"\xff\xff\xff\x7f" + h[3:], "integer too long"),
    (lambda h: h[:6] + b"\x04" + h[7:], "unknown header flags"),
    (lambda h: h + b"\x00", "trailing"),
    (lambda h: h[:-1], "truncated"),
])
def test_version_4_header_fields_are_checked(edit, message):
    data = make_file(arch=Architecture(3, (12, 6), 4, *bs.DEFAULT_PE), width=1 << 20)
    with pytest.raises(FormatError, match=message):
        bs.loads(_with_payload(data, b"NHDR", edit(_payload(data, b"NHDR"))))
    plain = _payload(data, b"NHDR")
    with pytest.raises(FormatError, match="without a modulation network"):
        bs.loads(_with_payload(data, b"NHDR", plain[:6] + b"\x02" + plain[7:]))


def test_version_4_qmax_must_be_minimal():
    data = make_file()
    w = _payload(data, b"WGTS")
    assert w[3] == 7  # the first record: step, decay index, qmax 7
    with pytest.raises(FormatError, match="non-minimal qmax"):
        bs.loads(_with_payload(data, b"WGTS", w[:3] + b"\x80\x07" + w[4:]))


def test_version_5_adds_the_input_layers_decay_slope_in_one_byte_and_is_version_4_without_it():
    for slope in (-128, -13, 1, 127):
        data = make_file(slope=slope)
        f = bs.loads(data)
        assert data[7] == 5 and f.version == 5 and f.codings[0].slope == slope and f.codings[1].slope == 0
        assert len(_payload(data, b"WGTS")) == len(_payload(make_file(), b"WGTS")) + 1
        w = _payload(data, b"WGTS")
        assert w[4] == slope & 0xFF  # after the first record's step, decay index and qmax
    assert make_file()[7] == 4 and make_file() == make_file(version=4)  # no slope: version 4's bytes
    assert bs.loads(make_file(slope=-13)).header == bs.loads(make_file()).header


def _sloped(*first: TensorCoding) -> list[TensorCoding]:
    """ARCH's codings: `first`, then plain Laplace ones."""
    return [*first] + [TensorCoding(2**-7, 7, bs.MODEL_LAPLACE, PARAM)] * (len(ARCH.tensor_shapes()) - len(first))


@pytest.mark.parametrize("first, message", [
    ((TensorCoding(2**-7, 7, bs.MODEL_LAPLACE, PARAM, 0), TensorCoding(2**-7, 7, bs.MODEL_LAPLACE, PARAM, -3)), "only the genesis"),
    ((TensorCoding(2**-7, 7, bs.MODEL_UNIFORM, 0, -3),), "needs a Laplace model"),
    ((TensorCoding(2**-7, 7, bs.MODEL_LAPLACE, 40000, -3),), "needs a Laplace model from version 4's table"),
    ((TensorCoding(2**-7, 7, bs.MODEL_LAPLACE, PARAM, -129),), "signed byte"),
])
def test_a_decay_slope_no_record_can_hold_is_refused(first, message):
    with pytest.raises(ValueError, match=message):
        bs.dumps(NifFile(Header(9, 9, "RGB", 0, ARCH), _sloped(*first), b"\x01\x00\x00\x00"))


def test_version_5_slope_needs_version_5_and_a_laplace_model():
    good = _sloped(TensorCoding(2**-7, 7, bs.MODEL_LAPLACE, PARAM, -3))
    with pytest.raises(ValueError, match="needs version 5"):
        bs.dumps(NifFile(Header(9, 9, "RGB", 0, ARCH), good, b"\x01\x00\x00\x00", version=4))
    data = make_file(slope=-3)
    w = _payload(data, b"WGTS")
    assert w[2] == bs.LAPLACE_PARAMS.index(PARAM)
    with pytest.raises(FormatError, match="slope without a Laplace model"):  # decay index 0: uniform
        bs.loads(_with_payload(data, b"WGTS", w[:2] + b"\x00" + w[3:]))
