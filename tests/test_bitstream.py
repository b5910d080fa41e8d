import struct
import zlib

import pytest

from pillow_nif import bitstream as bs
from pillow_nif.bitstream import Architecture, FormatError, Header, NifFile, TensorCoding

ARCH = Architecture(3, (12, 6), 4, 1.4, 30.0, (8,), 2, 30.0, 10.0)


def make_file(arch=ARCH, metadata=None, stream=b"\x01\x00\x00\x00" * 64, step=2**-7, version=bs.VERSION) -> bytes:
    codings = [TensorCoding(step, 7, bs.MODEL_LAPLACE, 40000) for _ in arch.tensor_shapes()]
    return bs.dumps(NifFile(Header(97, 61, "RGB", bs.COLOUR_YCBCR, arch), codings, stream, metadata or {}, version))


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">4sI", kind, len(payload)) + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_round_trip_keeps_every_field():
    data = make_file(metadata={"icc_profile": b"icc", "exif": b"II*\x00", "xmp": b"<x/>"})
    f = bs.loads(data)
    assert f.header == Header(97, 61, "RGB", bs.COLOUR_YCBCR, ARCH)
    assert f.codings[0] == TensorCoding(2**-7, 7, bs.MODEL_LAPLACE, 40000)
    assert f.metadata == {"icc_profile": b"icc", "exif": b"II*\x00", "xmp": b"<x/>"}
    assert bs.read_header(data) == f.header
    assert f.version == 3


def test_codings_version_2_cannot_hold_are_written_as_version_1_exactly():
    v2 = make_file(version=2)
    v1 = make_file(step=0.01, version=2)  # not a bfloat16
    assert v1[7] == 1 and v2[7] == 2 and make_file()[7] == 3 and make_file()[8:] == v2[8:]
    with pytest.raises(ValueError, match="version 3 needs"):  # a version-3 stream cannot go into version 1
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
    data = make_file()
    assert data.startswith(bs.MAGIC + bytes([bs.VERSION]))
    with pytest.raises(FormatError, match="not a NIF"):
        bs.loads(b"\x89PNG\r\n\x1a\n" + data[8:])
    with pytest.raises(FormatError, match="unsupported NIF version 4"):
        bs.loads(bs.MAGIC + b"\x04" + data[8:])


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
    data = bytearray(make_file())
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
