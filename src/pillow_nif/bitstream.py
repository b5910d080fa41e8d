"""The .nif container, versions 1 to 9, in pure Python (no torch): see docs/FORMAT.md.

A file is ``MAGIC`` (7 bytes) + a version byte + chunks. Each chunk is
``type (4 ASCII) | length (u32 BE) | payload | CRC32 (u32 BE, over type and payload)``,
as in PNG. An upper-case first letter marks a critical chunk (a reader that does not
know it must refuse the file), a lower-case one an ancillary chunk (skipped if unknown).

Every length and size is checked against the bytes present and against fixed maxima
before anything is allocated, so a hostile file costs at most its own size to parse.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib

MAGIC = b"\x8bNIF\r\n\x1a"
# Version 2 differs from 1 only in the WGTS records: 6 bytes (bfloat16 step, qmax, param) instead of 9.
# At 0.3 bpp on 256x256 that is 1.3 % of the file. Version 3 has version 2's records and codes the order and
# signs of each sine layer's neurons as data (bits-back, see entropy.py): 1.1-2 % of the file. Version 4 has
# version 3's stream in a compact header and 4-5-byte records (the entropy model's decay as an index into a
# fixed table): the container took 4.4 / 3.5 / 2.1 % of a 256x256 file at 0.3 / 0.6 / 1.0 bpp, version 4
# about half that. Version 5 adds to the genesis input layer's record a slope of its decay across the encoding's
# frequencies (a file's high-frequency weights are smaller): 0.5-1.6 % of a file at 0.6-1.0 bpp. The encoder
# writes 5, or 4 when the slope is 0 (the same bytes as before). Version 6 is version 5 with a post-filter (see
# postfilter.py): a header flag, the filter's size, and its three tensors after the network's; the encoder writes 6
# only for a file with a filter. Version 7 is version 6 with the filter's neighbours chosen per image: a 5-byte mask
# over postfilter.OFFSETS instead of the count of its first ones; the encoder writes 7 only for a filter version 6
# cannot hold. Version 8 is version 7 with one set of filter coefficients per class of local activity: a header
# flag, the K - 1 thresholds between the classes, and K times the rows in the filter's tensors; the encoder writes 8
# only for a filter with classes. Version 9 is a grid of tiles, each a whole file of versions 1-8 (TiledFile): the
# encoder writes it only for images over FitConfig.tile_pixels. Readers accept all nine.
VERSION = 8  # the newest untiled version (NifFile)
TILED_VERSION = 9
VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, TILED_VERSION)
SIGNATURE = MAGIC + bytes([VERSION])

# Modes: code -> (Pillow mode, channels, bits per sample).
MODES = {
    1: ("L", 1, 8),
    2: ("LA", 2, 8),
    3: ("RGB", 3, 8),
    4: ("RGBA", 4, 8),
    5: ("I;16", 1, 16),
}
MODE_CODES = {name: code for code, (name, _, _) in MODES.items()}

# Colour transforms applied to the first three channels before fitting.
COLOUR_IDENTITY = 0
COLOUR_YCBCR = 1
COLOURS = (COLOUR_IDENTITY, COLOUR_YCBCR)

# Entropy models of one quantised tensor (see entropy.py).
MODEL_UNIFORM = 0
MODEL_LAPLACE = 1
ENTROPY_MODELS = (MODEL_UNIFORM, MODEL_LAPLACE)

# Version 4's decays: index p = 1..255 stands for param = 65536 - (_ROOTS[p % 16] >> (p // 16)), i.e.
# 1 - r = 2^(-p/16) rounded to the 1/65536 grid, in integers only. The encoder's search grid was coarser
# (0.1 octave); one index byte replaces a two-byte param. Near r = 1 neighbours coincide (65534, 65535).
_ROOTS = (65536, 62757, 60097, 57549, 55109, 52773, 50535, 48393, 46341, 44376, 42495, 40693, 38968, 37316, 35734, 34219)
LAPLACE_PARAMS = (0,) + tuple(65536 - (_ROOTS[p % 16] >> (p // 16)) for p in range(1, 256))  # [0]: uniform
LAPLACE_INDEX = {param: p for p, param in reversed(list(enumerate(LAPLACE_PARAMS)))}  # param -> first index
# Version 4 header: hyperparameters left out when they are the encoder's (as JPEG XL's all_default flags).
DEFAULT_PE = (1.4, 45.0)  # pe_scale, omega
DEFAULT_MOD = (45.0, 10.0)  # mod_omega, mod_sigma

# Sanity limits: far above anything the encoder writes, far below what could exhaust memory.
MAX_DIM = 1 << 20
MAX_LAYERS = 8
MAX_WIDTH = 2048
MAX_FREQS = 24
MAX_PARAMS = 1 << 22
MAX_QMAX = (1 << 15) - 1
MAX_CHUNK = 1 << 28
FILTER_OFFSETS = 40  # len(postfilter.OFFSETS): the neighbours within 4 pixels, one of each point-symmetric pair
V6_FILTER_TAPS = 12  # version 6: the first 12 of them at most (len(postfilter.DIRECTIONS), 5x5)
FILTER_CLASSES = 8  # version 8: the most classes of activity a post-filter may have (coefficient sets)
# A parameter costs at least this many bits on average: bounds the parameter count by the file
# size (the encoder never goes near it; a hostile header cannot ask for a huge network in a tiny file).
MIN_BITS_PER_PARAM = 1 / 8
MAX_TILES = 1 << 12  # tiles of a version-9 file (the encoder's 12-megapixel photos take ~21)

CHUNK_HEADER = b"NHDR"
CHUNK_WEIGHTS = b"WGTS"
CHUNK_TILES = b"TILE"  # version 9: the grid, first
CHUNK_TILE_DATA = b"TDAT"  # version 9: one tile's whole file, in row-major order
CHUNK_ICC = b"iCCP"
CHUNK_EXIF = b"eXIf"
CHUNK_XMP = b"xMPd"
# An alpha channel of one value everywhere (one byte), which an L or RGB file shows as LA or RGBA: the encoder does
# not fit it (a fitted opaque alpha cost the colours 0.75-1.4 dB). Ancillary: a reader that skips it shows L or RGB.
CHUNK_ALPHA = b"aLPH"
# A fitted alpha's ends (two bytes, lo and hi): a decoder shows an alpha of at most lo as 0 and one of at least
# 255 - hi as 255, since the network's 0s and 255s come back off by up to ~25 (a transparent surround that is not
# transparent). The encoder picks them against the image. Ancillary: a reader that skips it shows the raw alpha.
CHUNK_ALPHA_ENDS = b"aEND"
# Each end as applied at any size but the stored one. A hard-edged alpha wants ends up to 127 (nearly two values) at
# the size it was fitted at, but a resampled alpha's soft edge is the right answer there (NOTES.md #215).
ALPHA_END_RESAMPLED = 32
# The metadata a caller gives an encoder (the rest of METADATA_CHUNKS the encoder derives from the image).
METADATA = ("icc_profile", "exif", "xmp")
METADATA_CHUNKS = {CHUNK_ICC: "icc_profile", CHUNK_EXIF: "exif", CHUNK_XMP: "xmp", CHUNK_ALPHA: "alpha",
                   CHUNK_ALPHA_ENDS: "alpha_ends"}


class FormatError(SyntaxError):
    """A malformed or unsupported .nif file (a SyntaxError, as Pillow's plugins raise)."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Every hyperparameter the decoder needs to rebuild the network."""

    channels: int
    widths: tuple[int, ...]  # genesis sine layers, widest first
    pe_freqs: int  # positional-encoding frequencies of the genesis network
    pe_scale: float  # frequency i is pi * pe_scale**i
    omega: float  # base sine period factor of the genesis layers
    mod_widths: tuple[int, ...] = ()  # modulation network sine layers; () = no modulation
    mod_freqs: int = 0
    mod_omega: float = 30.0
    mod_sigma: float = 1.0  # scale of the modulation output
    filter_mask: int = 0  # versions 6-8: the post-filter's pairs of neighbours, bit i = postfilter.OFFSETS[i]; 0: none
    # version 8: the activity thresholds between the post-filter's classes (one class more than thresholds), f32
    filter_thresholds: tuple[float, ...] = ()

    def __post_init__(self):
        # Round floats through f32 so an Architecture equals what the file stores.
        for name in ("pe_scale", "omega", "mod_omega", "mod_sigma"):
            object.__setattr__(self, name, _f32(getattr(self, name)))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "mod_widths", tuple(int(w) for w in self.mod_widths))
        object.__setattr__(self, "filter_thresholds", tuple(_f32(v) for v in self.filter_thresholds))

    @property
    def filter_taps(self) -> int:
        """The post-filter's pairs of neighbours (0: no filter)."""
        return bin(self.filter_mask).count("1")

    @property
    def filter_classes(self) -> int:
        """The post-filter's sets of coefficients (1 unless version 8 splits the pixels by activity)."""
        return len(self.filter_thresholds) + 1

    @property
    def pe_dim(self) -> int:
        return 2 + 4 * self.pe_freqs

    @property
    def mod_pe_dim(self) -> int:
        return 2 + 4 * self.mod_freqs

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the stored tensors, in bitstream order. Weights are (out, in)."""
        shapes = []
        dims = [self.pe_dim, *self.widths, self.channels]
        for i in range(len(dims) - 1):
            shapes += [(f"genesis.{i}.weight", (dims[i + 1], dims[i])), (f"genesis.{i}.bias", (dims[i + 1],))]
        if self.mod_widths:
            dims = [self.mod_pe_dim, *self.mod_widths, 1]
            for i in range(len(dims) - 1):
                shapes += [(f"modulation.{i}.weight", (dims[i + 1], dims[i])), (f"modulation.{i}.bias", (dims[i + 1],))]
        if self.filter_taps:
            rows = self.filter_classes * self.channels  # class k's rows: k C ... k C + C - 1
            shapes += [
                ("filter.mix", (rows, self.channels)),
                ("filter.taps", (rows, self.channels * self.filter_taps)),
                ("filter.offset", (rows,)),
            ]
        return shapes

    def sine_layers(self) -> list[tuple[int, int, int]]:
        """(weight, bias, next weight) tensor indices of each sine layer, in bitstream order. Its neurons can be
        permuted, or negated (sin is odd), with the next layer's columns, without changing the network."""
        out, base = [], 0
        for widths in (self.widths, self.mod_widths):
            out += [(base + 2 * i, base + 2 * i + 1, base + 2 * i + 2) for i in range(len(widths))]
            base += 2 * (len(widths) + 1)
        return out

    def num_params(self) -> int:
        total = 0
        for _, shape in self.tensor_shapes():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def validate(self) -> None:
        if not 1 <= self.channels <= 4:
            raise FormatError(f"unsupported channel count {self.channels}")
        if not 1 <= len(self.widths) <= MAX_LAYERS or len(self.mod_widths) > MAX_LAYERS:
            raise FormatError("unsupported number of layers")
        if any(not 1 <= w <= MAX_WIDTH for w in (*self.widths, *self.mod_widths)):
            raise FormatError("layer width out of range")
        if not 0 <= self.filter_mask < 1 << FILTER_OFFSETS:
            raise FormatError("post-filter neighbours out of range")
        t = self.filter_thresholds
        if t and not self.filter_mask:
            raise FormatError("post-filter classes without a post-filter")
        if len(t) >= FILTER_CLASSES or not all(0 <= v < math.inf for v in t) or any(a >= b for a, b in zip(t, t[1:])):
            raise FormatError("post-filter class thresholds out of range")
        if self.pe_freqs > MAX_FREQS or self.mod_freqs > MAX_FREQS:
            raise FormatError("too many encoding frequencies")
        for v in (self.pe_scale, self.omega, self.mod_omega, self.mod_sigma):
            if not (abs(v) < 1e6):  # also rejects NaN and inf
                raise FormatError("hyperparameter out of range")
        if self.num_params() > MAX_PARAMS:
            raise FormatError("network too large")


class _Mode:
    """Facts of a header's `mode`."""

    mode: str

    @property
    def channels(self) -> int:
        return MODES[MODE_CODES[self.mode]][1]

    @property
    def bits(self) -> int:
        return MODES[MODE_CODES[self.mode]][2]


@dataclasses.dataclass(frozen=True)
class Header(_Mode):
    width: int
    height: int
    mode: str
    colour: int
    arch: Architecture


@dataclasses.dataclass(frozen=True)
class TensorCoding:
    """How one tensor was quantised and entropy coded: value = step * symbol, |symbol| <= qmax."""

    step: float
    qmax: int
    model: int
    param: int  # model parameter (Laplace decay in 1/65536)
    # Version 5, the genesis input layer (tensor 0) only: its columns' decay index, p + floor(slope * g / 4) for
    # the columns of encoding group g (entropy.frequency_groups), instead of p for all.
    slope: int = 0

    def __post_init__(self):
        object.__setattr__(self, "step", _f32(self.step))


@dataclasses.dataclass
class NifFile:
    header: Header
    codings: list[TensorCoding]
    stream: bytes  # the constriction ANS words, little-endian u32
    metadata: dict[str, bytes] = dataclasses.field(default_factory=dict)
    # 3 and up: the stream arranges the sine layers' neurons (entropy.encode with the architecture); dumps() writes
    # the lowest of 3-5 that holds the codings (up to this version). 1 or 2: it does not; dumps() writes 2, or 1
    # for codings a version-2 record cannot hold. loads() sets it.
    version: int = VERSION


@dataclasses.dataclass(frozen=True)
class TileGrid(_Mode):
    """A version-9 file's image: its size and mode, cut into `columns` x `rows` tiles whose edges fall at
    k * width // columns and k * height // rows (so tiles differ by at most a pixel a side). Each tile's network
    covers its box grown by `margin` pixels on each side inside the image (`extents`); where two overlap, the
    decoder blends them, each weighted by a linear ramp across the 2 * margin pixels about the edge (render.py)."""

    width: int
    height: int
    mode: str
    columns: int
    rows: int
    margin: int = 0

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of each tile, row by row (Pillow's crop boxes)."""
        xs = [k * self.width // self.columns for k in range(self.columns + 1)]
        ys = [k * self.height // self.rows for k in range(self.rows + 1)]
        return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(self.rows) for i in range(self.columns)]

    def extents(self) -> list[tuple[int, int, int, int]]:
        """Each tile's box grown by the margin, within the image: what its network is fitted to and covers."""
        m = self.margin
        return [(max(0, x0 - m), max(0, y0 - m), min(self.width, x1 + m), min(self.height, y1 + m))
                for x0, y0, x1, y1 in self.boxes()]


@dataclasses.dataclass
class TiledFile:
    """Version 9: an image too large for one network, as a grid of tiles, each its own untiled file (without
    metadata, which the tiled file holds once)."""

    grid: TileGrid
    tiles: list[NifFile]  # loads() gives parsed files; dumps_tiled() also takes each tile's bytes
    metadata: dict[str, bytes] = dataclasses.field(default_factory=dict)
    version: int = TILED_VERSION

    @property
    def header(self) -> TileGrid:  # what the plugin reads of any file: width, height, mode
        return self.grid


_TILES = struct.Struct(">IIBHHH")  # width, height, mode code, columns, rows, margin


def dumps_tiled(t: TiledFile) -> bytes:
    """A version-9 file; each tile's file (bytes or NifFile) must match its extent and the grid's mode."""
    g = t.grid
    _check_grid(g)
    extents = g.extents()
    if len(t.tiles) != len(extents):
        raise ValueError(f"{len(extents)} tiles are needed, got {len(t.tiles)}")
    out = [MAGIC + bytes([TILED_VERSION]), chunk(CHUNK_TILES, _TILES.pack(g.width, g.height, MODE_CODES[g.mode],
                                                                         g.columns, g.rows, g.margin))]
    for tile, (x0, y0, x1, y1) in zip(t.tiles, extents):
        data = tile if isinstance(tile, (bytes, bytearray)) else dumps(tile)
        f = loads(bytes(data))  # a tile must be a whole untiled file of its extent
        if not isinstance(f, NifFile):
            raise ValueError("a tile cannot itself be tiled")
        h = f.header
        if (h.width, h.height, h.mode) != (x1 - x0, y1 - y0, g.mode):
            raise ValueError(f"tile {x0},{y0} is {h.width}x{h.height} {h.mode}, "
                             f"its extent {x1 - x0}x{y1 - y0} {g.mode}")
        out.append(chunk(CHUNK_TILE_DATA, bytes(data)))
    for kind, key in METADATA_CHUNKS.items():
        if t.metadata.get(key):
            out.append(chunk(kind, bytes(t.metadata[key])))
    return b"".join(out)


def tiled_overhead(metadata: dict) -> tuple[int, int]:
    """(bytes of a version-9 file besides its tiles' files, bytes each tile's chunk adds to its file)."""
    meta = sum(12 + len(v) for k, v in metadata.items() if k in METADATA_CHUNKS.values() and v)
    return len(SIGNATURE) + 12 + _TILES.size + meta, 12


def _check_grid(g: TileGrid) -> None:
    if not (1 <= g.width <= MAX_DIM and 1 <= g.height <= MAX_DIM):
        raise FormatError(f"image size {g.width}x{g.height} out of range")
    if not (1 <= g.columns <= g.width and 1 <= g.rows <= g.height and g.columns * g.rows <= MAX_TILES):
        raise FormatError(f"bad tile grid {g.columns}x{g.rows} for a {g.width}x{g.height} image")
    # Ramps from both edges of a tile must not meet: the margin is at most half the smallest tile's side.
    if 2 * g.margin > min(g.width // g.columns, g.height // g.rows):
        raise FormatError(f"tile margin {g.margin} too large for {g.columns}x{g.rows} tiles of {g.width}x{g.height}")


def _parse_grid(payload: bytes) -> TileGrid:
    if len(payload) != _TILES.size:
        raise FormatError("bad tile grid chunk length")
    w, h, code, columns, rows, margin = _TILES.unpack(payload)
    if code not in MODES:
        raise FormatError(f"unknown mode code {code}")
    g = TileGrid(w, h, MODES[code][0], columns, rows, margin)
    _check_grid(g)
    return g


def _loads_tiled(data: bytes) -> TiledFile:
    grid, tiles, metadata = None, [], {}
    boxes: list = []
    for kind, payload in iter_chunks(data):
        if grid is None:
            if kind != CHUNK_TILES:
                raise FormatError("the first chunk of a tiled file must be its tile grid")
            grid = _parse_grid(payload)
            boxes = grid.extents()
        elif kind == CHUNK_TILE_DATA:
            if len(tiles) == len(boxes):
                raise FormatError("more tiles than the grid has")
            if payload[len(MAGIC) : len(MAGIC) + 1] == bytes([TILED_VERSION]):
                raise FormatError("a tile cannot itself be tiled")
            tile = loads(payload)
            x0, y0, x1, y1 = boxes[len(tiles)]
            h = tile.header
            if (h.width, h.height, h.mode) != (x1 - x0, y1 - y0, grid.mode):
                raise FormatError(f"tile {len(tiles)} is {h.width}x{h.height} {h.mode}, its place "
                                  f"{x1 - x0}x{y1 - y0} {grid.mode}")
            tiles.append(tile)
        elif kind in METADATA_CHUNKS:
            metadata[METADATA_CHUNKS[kind]] = payload
        elif kind == CHUNK_TILES:
            raise FormatError("duplicate tile grid chunk")
        elif kind[:1].isupper():
            raise FormatError(f"unknown critical chunk {kind.decode('latin-1')}")
    if grid is None:
        raise FormatError("missing tile grid chunk")
    if len(tiles) != len(boxes):
        raise FormatError(f"{len(tiles)} of {len(boxes)} tiles (truncated file?)")
    constant_alpha(metadata, grid.mode)
    alpha_ends(metadata, grid.mode)
    return TiledFile(grid, tiles, metadata)


def _f32_bits(v: float) -> int:
    return struct.unpack(">I", struct.pack(">f", v))[0]


def _bits_f32(bits: int) -> float:
    return struct.unpack(">f", struct.pack(">I", bits))[0]


def bf16_ceil(v: float) -> float:
    """The smallest bfloat16 (an f32 with 16 zero low bits) >= v > 0: the step grid of version 2."""
    return _bits_f32((_f32_bits(v) + 0xFFFF) & 0xFFFF0000)


def _compact(c: TensorCoding) -> bool:
    """Whether a coding fits a version-2 record."""
    return bf16_ceil(c.step) == c.step and (c.param == 0) == (c.model == MODEL_UNIFORM)


def _compact4(c: TensorCoding) -> bool:
    """Whether a coding fits a version-4 record (a decay from LAPLACE_PARAMS)."""
    return _compact(c) and c.param in LAPLACE_INDEX and c.qmax <= MAX_QMAX


MIN_SLOPE, MAX_SLOPE = -128, 127  # a signed byte


def _check_slopes(codings: list[TensorCoding]) -> bool:
    """Whether the codings have a decay slope (version 5); ValueError for slopes no record can hold."""
    if any(c.slope for c in codings[1:]):
        raise ValueError("only the genesis input layer's coding (the first) can have a decay slope")
    c = codings[0]
    if c.slope and not (c.model == MODEL_LAPLACE and _compact4(c) and MIN_SLOPE <= c.slope <= MAX_SLOPE):
        raise ValueError("a decay slope needs a Laplace model from version 4's table and a slope in a signed byte")
    return bool(c.slope)


def _f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", float(v)))[0]


_HDR = struct.Struct(">IIBBBff")  # width height mode colour pe_freqs pe_scale omega
_MOD = struct.Struct(">Bff")  # mod_freqs mod_omega mod_sigma
_CODING = struct.Struct(">fHBH")  # version 1: step qmax model param
_CODING2 = struct.Struct(">HHH")  # version 2: step (bfloat16) qmax param (0: uniform, else Laplace)
_F32X2 = struct.Struct(">ff")


def chunk(kind: bytes, payload: bytes) -> bytes:
    """One chunk: the kind, the payload's length, the payload, the CRC of kind and payload (PNG: length first)."""
    return struct.pack(">4sI", kind, len(payload)) + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _widths(ws: tuple[int, ...]) -> bytes:
    return bytes([len(ws)]) + b"".join(struct.pack(">H", w) for w in ws)


def _varint(v: int) -> bytes:
    """LEB128: 7 bits a byte, least significant first, the high bit set on all but the last byte."""
    out = bytearray()
    while v >= 0x80:
        out.append(0x80 | (v & 0x7F))
        v >>= 7
    return bytes(out + bytes([v]))


def _qmax4(q: int) -> bytes:
    return bytes([q]) if q < 0x80 else struct.pack(">H", 0x8000 | q)


def _v6_filter(mask: int) -> bool:
    """Whether version 6 holds the filter: the first D offsets, D <= 12."""
    return mask & (mask + 1) == 0 and mask < 1 << V6_FILTER_TAPS


def _pack_header4(h: Header, version: int) -> bytes:
    a = h.arch
    pe, mod = (a.pe_scale, a.omega), (a.mod_omega, a.mod_sigma)
    flags = int(pe != tuple(map(_f32, DEFAULT_PE))) | int(bool(a.mod_widths) and mod != tuple(map(_f32, DEFAULT_MOD))) << 1
    flags |= int(bool(a.filter_taps)) << 2 | int(bool(a.filter_thresholds)) << 3
    out = _varint(h.width) + _varint(h.height) + bytes([MODE_CODES[h.mode] | h.colour << 4, a.pe_freqs, flags])
    if flags & 1:
        out += _F32X2.pack(*pe)
    for ws in (a.widths, a.mod_widths):
        out += bytes([len(ws)]) + b"".join(_varint(w) for w in ws)
    if a.mod_widths:
        out += bytes([a.mod_freqs]) + (_F32X2.pack(*mod) if flags & 2 else b"")
    if a.filter_mask:
        out += a.filter_mask.to_bytes(5, "little") if version >= 7 else bytes([a.filter_taps])
    if a.filter_thresholds:
        out += bytes([len(a.filter_thresholds)]) + struct.pack(f"<{len(a.filter_thresholds)}f", *a.filter_thresholds)
    return out


def _filter_version(a: Architecture) -> int:
    """The lowest version that holds the post-filter (0: there is none)."""
    if not a.filter_mask:
        return 0
    return 8 if a.filter_thresholds else 6 if _v6_filter(a.filter_mask) else 7


def pack_header(h: Header, version: int = VERSION) -> bytes:
    if version < _filter_version(h.arch):
        raise ValueError(f"this post-filter needs version {_filter_version(h.arch)}" if version >= 6
                         else "a post-filter needs version 6")
    if version >= 4:
        return _pack_header4(h, version)
    a = h.arch
    out = _HDR.pack(h.width, h.height, MODE_CODES[h.mode], h.colour, a.pe_freqs, a.pe_scale, a.omega)
    out += _widths(a.widths) + _widths(a.mod_widths)
    if a.mod_widths:
        out += _MOD.pack(a.mod_freqs, a.mod_omega, a.mod_sigma)
    return out


def dumps(f: NifFile) -> bytes:
    h = f.header
    if len(f.codings) != len(h.arch.tensor_shapes()):
        raise ValueError("one coding per tensor is needed")
    if len(f.stream) % 4:
        raise ValueError("the entropy-coded stream is a whole number of 32-bit words")
    if f.version >= 3 and not all(_compact(c) for c in f.codings):
        raise ValueError("versions 3 to 5 need codings a 6-byte record holds (bfloat16 steps)")
    graded = _check_slopes(f.codings)
    if graded and f.version < 5:
        raise ValueError("a decay slope needs version 5")
    filtered = bool(h.arch.filter_taps)
    if filtered and not (f.version >= 6 and all(_compact4(c) for c in f.codings)):
        raise ValueError("a post-filter needs version 6 and codings a version-4 record holds")
    if f.version >= 4 and all(_compact4(c) for c in f.codings):
        # the lowest version that holds the file: without a filter, version 6 is version 5's bytes; without a
        # slope either, version 4's
        version = _filter_version(h.arch) if filtered else 5 if graded else 4
        if version > f.version:
            raise ValueError(f"this post-filter needs version {version}")
        records = [struct.pack(">HB", _f32_bits(c.step) >> 16, LAPLACE_INDEX[c.param]) + _qmax4(c.qmax) for c in f.codings]
        if version >= 5:  # the first record's slope byte (0 in a version 6-8 file without one)
            records[0] += struct.pack(">b", f.codings[0].slope)
    elif all(_compact(c) for c in f.codings):  # version 4's stream with decays off its table is version 3's
        version = 3 if f.version >= 3 else 2
        records = [_CODING2.pack(_f32_bits(c.step) >> 16, c.qmax, c.param) for c in f.codings]
    else:  # steps or parameters that version 2 cannot hold (hand-made codings of a version 1-2 stream)
        version = 1
        records = [_CODING.pack(c.step, c.qmax, c.model, c.param) for c in f.codings]
    weights = b"".join(records) + f.stream
    out = [MAGIC + bytes([version]), chunk(CHUNK_HEADER, pack_header(h, version)), chunk(CHUNK_WEIGHTS, weights)]
    for kind, key in METADATA_CHUNKS.items():
        value = f.metadata.get(key)
        if value:
            out.append(chunk(kind, bytes(value)))
    return b"".join(out)


class _Reader:
    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise FormatError(f"truncated {self.what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct):
        return st.unpack(self.take(st.size))

    def widths(self, compact: bool = False) -> tuple[int, ...]:
        (n,) = self.take(1)
        if n > MAX_LAYERS:
            raise FormatError("too many layers")
        if compact:  # version 4: LEB128
            return tuple(self.varint(3) for _ in range(n))
        return struct.unpack(f">{n}H", self.take(2 * n))

    def varint(self, max_bytes: int) -> int:
        v = 0
        for i in range(max_bytes):
            (b,) = self.take(1)
            v |= (b & 0x7F) << (7 * i)
            if b < 0x80:
                if b == 0 and i:  # one encoding per value: no trailing zero group
                    raise FormatError(f"non-minimal integer in {self.what}")
                return v
        raise FormatError(f"integer too long in {self.what}")


def _parse_header4(r: _Reader, version: int):
    width, height = r.varint(3), r.varint(3)
    mode, pe_freqs, flags = r.take(3)
    if flags > (15 if version >= 8 else 7 if version >= 6 else 3):
        raise FormatError(f"unknown header flags {flags:#x}")
    pe_scale, omega = r.unpack(_F32X2) if flags & 1 else DEFAULT_PE
    widths, mod_widths = r.widths(compact=True), r.widths(compact=True)
    mod = (0, 30.0, 1.0)
    if mod_widths:
        (mod_freqs,) = r.take(1)
        mod = (mod_freqs, *(r.unpack(_F32X2) if flags & 2 else DEFAULT_MOD))
    elif flags & 2:
        raise FormatError("modulation hyperparameters without a modulation network")
    mask = 0
    if flags & 4 and version >= 7:
        mask = int.from_bytes(r.take(5), "little")
        if not mask:
            raise FormatError("post-filter without neighbours")
    elif flags & 4:
        (taps,) = r.take(1)
        if not 1 <= taps <= V6_FILTER_TAPS:
            raise FormatError(f"post-filter size {taps} out of range")
        mask = (1 << taps) - 1
    thresholds = ()
    if flags & 8:
        if not flags & 4:
            raise FormatError("post-filter classes without a post-filter")
        (n,) = r.take(1)
        if not 1 <= n < FILTER_CLASSES:
            raise FormatError(f"post-filter classes {n + 1} out of range")
        thresholds = struct.unpack(f"<{n}f", r.take(4 * n))
    return width, height, mode & 0xF, mode >> 4, pe_freqs, pe_scale, omega, widths, mod_widths, mod, mask, thresholds


def parse_header(payload: bytes, version: int = VERSION) -> Header:
    r = _Reader(payload, "header chunk")
    mask, thresholds = 0, ()
    if version >= 4:
        (width, height, mode, colour, pe_freqs, pe_scale, omega, widths, mod_widths, mod, mask,
         thresholds) = _parse_header4(r, version)
    else:
        width, height, mode, colour, pe_freqs, pe_scale, omega = r.unpack(_HDR)
        widths = r.widths()
        mod_widths = r.widths()
        mod = r.unpack(_MOD) if mod_widths else (0, 30.0, 1.0)
    if r.pos != len(payload):
        raise FormatError("header chunk has trailing bytes")
    if mode not in MODES:
        raise FormatError(f"unknown mode code {mode}")
    if colour not in COLOURS:
        raise FormatError(f"unknown colour transform {colour}")
    if not (1 <= width <= MAX_DIM and 1 <= height <= MAX_DIM):
        raise FormatError(f"image size {width}x{height} out of range")
    _, channels, _ = MODES[mode]
    if colour == COLOUR_YCBCR and channels < 3:
        raise FormatError("YCbCr needs three colour channels")
    arch = Architecture(channels, widths, pe_freqs, pe_scale, omega, mod_widths, *mod, filter_mask=mask,
                        filter_thresholds=thresholds)
    arch.validate()
    return Header(width, height, MODES[mode][0], colour, arch)


def _record(r: _Reader, version: int) -> tuple[float, int, int, int]:
    if version == 1:  # versions 2 and 3 share the 6-byte record
        return r.unpack(_CODING)
    if version >= 4:  # step (bfloat16), decay index, qmax in one byte below 128, else two with the top bit set;
        # version 5's first record goes on with a slope byte (parse_weights)
        hi, lo, p, qmax = r.take(4)
        if qmax & 0x80:
            qmax = (qmax & 0x7F) << 8 | r.take(1)[0]
            if qmax < 0x80:
                raise FormatError("non-minimal qmax in weights chunk")
        return _bits_f32((hi << 8 | lo) << 16), qmax, MODEL_LAPLACE if p else MODEL_UNIFORM, LAPLACE_PARAMS[p]
    step, qmax, param = r.unpack(_CODING2)
    return _bits_f32(step << 16), qmax, MODEL_LAPLACE if param else MODEL_UNIFORM, param


def parse_weights(payload: bytes, arch: Architecture, version: int = VERSION) -> tuple[list[TensorCoding], bytes]:
    shapes = arch.tensor_shapes()
    r = _Reader(payload, "weights chunk")
    codings = []
    for i in range(len(shapes)):
        step, qmax, model, param = _record(r, version)
        slope = struct.unpack(">b", r.take(1))[0] if version >= 5 and i == 0 else 0
        if model not in ENTROPY_MODELS:
            raise FormatError(f"unknown entropy model {model}")
        if qmax > MAX_QMAX or not (abs(step) < 1e30):
            raise FormatError("quantisation parameters out of range")
        if model == MODEL_LAPLACE and not 1 <= param < 65536:
            raise FormatError("entropy model parameter out of range")
        if slope and model != MODEL_LAPLACE:
            raise FormatError("a decay slope without a Laplace model")
        codings.append(TensorCoding(step, qmax, model, param, slope))
    stream = payload[r.pos :]
    if len(stream) % 4:
        raise FormatError("entropy-coded stream is not a whole number of words")
    if stream[-4:] == b"\0\0\0\0":  # an ANS stream never ends in a zero word (constriction refuses it)
        raise FormatError("entropy-coded stream ends in a zero word (corrupt file)")
    if arch.num_params() * MIN_BITS_PER_PARAM > 8 * max(len(stream), 1):
        raise FormatError("network too large for the data present (truncated or corrupt file)")
    return codings, stream


def iter_chunks(data: bytes, offset: int = len(SIGNATURE)):
    """Yield (type, payload) of each chunk, checking lengths and CRCs."""
    pos = offset
    while pos < len(data):
        if pos + 8 > len(data):  # a cut file, or bytes appended to a whole one: no end chunk tells them apart
            n = len(data) - pos
            raise FormatError(f"truncated chunk header ({n} byte{'s' * (n > 1)} after the last whole chunk)")
        kind, length = struct.unpack_from(">4sI", data, pos)
        if not kind.isalpha():
            raise FormatError(f"invalid chunk type {kind!r}")
        if length > MAX_CHUNK or pos + 12 + length > len(data):
            raise FormatError(f"truncated chunk {kind.decode('latin-1')}")
        payload = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(kind + payload) != crc:
            raise FormatError(f"bad CRC in chunk {kind.decode('latin-1')}")
        yield kind, payload
        pos += 12 + length


def check_signature(data: bytes) -> None:
    if len(data) < len(SIGNATURE) and SIGNATURE.startswith(data[: len(MAGIC)]):
        raise FormatError("truncated NIF signature")
    if data[: len(MAGIC)] != MAGIC:
        raise FormatError("not a NIF file")
    if data[len(MAGIC)] not in VERSIONS:
        raise FormatError(f"unsupported NIF version {data[len(MAGIC)]}")


def read_header(data: bytes) -> Header | TileGrid:
    """Parse only the signature and the header chunk (which comes first): a tiled file's grid."""
    check_signature(data)
    if data[len(MAGIC)] == TILED_VERSION:
        for kind, payload in iter_chunks(data[: len(SIGNATURE) + 12 + _TILES.size]):
            if kind != CHUNK_TILES:
                break
            return _parse_grid(payload)
        raise FormatError("the first chunk of a tiled file must be its tile grid")
    for kind, payload in iter_chunks(data[: len(SIGNATURE) + 12 + _header_length(data)]):
        if kind == CHUNK_HEADER:
            return parse_header(payload, data[len(MAGIC)])
    raise FormatError("missing header chunk")


def _header_length(data: bytes) -> int:
    pos = len(SIGNATURE)
    if len(data) < pos + 8:
        raise FormatError("truncated chunk header")
    kind, length = struct.unpack_from(">4sI", data, pos)
    if kind != CHUNK_HEADER:
        raise FormatError("the first chunk must be the header")
    return min(length, MAX_CHUNK)


def constant_alpha(metadata: dict, mode: str) -> int | None:
    """The alpha value of a file whose alpha channel is one value (an aLPH chunk), else None."""
    alpha = metadata.get("alpha")
    if alpha is None:
        return None
    if len(alpha) != 1 or mode not in ("L", "RGB"):
        raise FormatError(f"bad alpha chunk ({len(alpha)} bytes in a {mode} file)")
    return alpha[0]


def alpha_ends(metadata: dict, mode: str, stored_size: bool = True) -> tuple[int, int] | None:
    """(lo, hi) of a file's aEND chunk: its alpha at most lo shows as 0, at least 255 - hi as 255; else None. Away
    from the stored size (`stored_size` False) each is at most ALPHA_END_RESAMPLED."""
    ends = metadata.get("alpha_ends")
    if ends is None:
        return None
    if len(ends) != 2 or mode not in ("LA", "RGBA") or ends[0] + ends[1] >= 255:
        raise FormatError(f"bad alpha ends chunk ({bytes(ends).hex()} in a {mode} file)")
    cap = 255 if stored_size else ALPHA_END_RESAMPLED
    return min(ends[0], cap), min(ends[1], cap)


def image_info(metadata: dict) -> dict:
    """The metadata a decoded image's `info` shows: ICC, EXIF, XMP (the alpha chunks are the alpha channel's)."""
    return {k: v for k, v in metadata.items() if k not in ("alpha", "alpha_ends")}


def shown_mode(mode: str, metadata: dict) -> str:
    """The mode a file decodes to: its stored mode, with a constant alpha channel added (L to LA, RGB to RGBA)."""
    return mode + "A" if constant_alpha(metadata, mode) is not None else mode


def read_metadata(data: bytes) -> dict[str, bytes]:
    """Metadata chunks with valid CRCs, leniently: stops at the first damaged chunk (load() reports it)."""
    out = {}
    try:
        for kind, payload in iter_chunks(data):
            if kind in METADATA_CHUNKS:
                out[METADATA_CHUNKS[kind]] = payload
    except FormatError:
        pass
    return out


def loads(data: bytes) -> NifFile | TiledFile:
    """Parse and check a whole file (every CRC); the weights stay entropy coded."""
    check_signature(data)
    if data[len(MAGIC)] == TILED_VERSION:
        return _loads_tiled(data)
    header = None
    weights = None
    metadata: dict[str, bytes] = {}
    for kind, payload in iter_chunks(data):
        if header is None:
            if kind != CHUNK_HEADER:
                raise FormatError("the first chunk must be the header")
            header = parse_header(payload, data[len(MAGIC)])
        elif kind == CHUNK_HEADER:
            raise FormatError("duplicate header chunk")
        elif kind == CHUNK_WEIGHTS:
            if weights is not None:
                raise FormatError("duplicate weights chunk")
            weights = parse_weights(payload, header.arch, data[len(MAGIC)])
        elif kind in METADATA_CHUNKS:
            metadata[METADATA_CHUNKS[kind]] = payload
        elif kind[:1].isupper():
            raise FormatError(f"unknown critical chunk {kind.decode('latin-1')}")
        # unknown ancillary chunks are skipped
    if header is None:
        raise FormatError("missing header chunk")
    if weights is None:
        raise FormatError("missing weights chunk (truncated file?)")
    constant_alpha(metadata, header.mode)
    alpha_ends(metadata, header.mode)
    return NifFile(header, weights[0], weights[1], metadata, data[len(MAGIC)])
