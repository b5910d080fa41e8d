"""Entropy coding of quantised weights with constriction (the only module that uses it).

All tensors of a file share one ANS stream. Each tensor has its own i.i.d. model, either uniform
over [-qmax, qmax] or a two-sided geometric ("discrete Laplace") distribution p(k) ~ r^|k| with
r = param / 65536. The geometric table is built with integer arithmetic only, so the encoder and
any decoder, on any CPU, hand constriction bit-identical inputs and get the same coding tables.
In version 5 the genesis input layer's decay may change across its encoding frequencies (one slope: its
high-frequency weights are smaller), its columns coded group by group (choose_graded).

Version 3 also codes data in the *arrangement* of each sine layer's neurons (bits-back coding; Townsend
et al. 2019, Severo et al. 2021 for multisets). A layer's n neurons (a row of its weight and its bias, with
the next layer's column) can be put in any of n! orders and each negated (sin is odd) without changing
the network, so a fixed i.i.d. code wastes log2(n!) + n bits a layer: 1.1-2 % of a file. The encoder stores
every layer in a canonical form (each neuron's key (bias, row) made to start positive, keys sorted; the
next layer's columns follow), then, for each layer, *decodes* an arrangement from the ANS stack (which
neuron goes first, ..., then the signs) and stores the layer's rows in it. The decoder reads the rows,
sees the arrangement, puts the layer back in canonical form (which is what the next layer's columns
expect) and *encodes* the arrangement back, restoring the stack for the tensors before it.
"""

from __future__ import annotations

import math

import numpy as np

from .bitstream import LAPLACE_INDEX, LAPLACE_PARAMS, MODEL_LAPLACE, MODEL_UNIFORM, FormatError, TensorCoding

_ONE = 1 << 40  # table scale: f(k) = floor(2^40 r^|k|), exact in float64
# The decays a version-4 record can name (1 - r in steps of 1/16 octave), as r: element p - 1 for index p.
_DECAYS = np.array(LAPLACE_PARAMS[1:], dtype=np.float64) / 65536.0


def laplace_frequencies(qmax: int, param: int) -> np.ndarray:
    """Unnormalised frequencies of symbols -qmax..qmax (float64, exact integers)."""
    half = [0] * (qmax + 1)
    f = _ONE
    for d in range(qmax + 1):
        half[d] = f
        f = (f * param) >> 16
        if f == 0:
            break
    half = np.array(half, dtype=np.float64)
    return np.concatenate([half[:0:-1], half])


def _probabilities(c: TensorCoding) -> np.ndarray:
    n = 2 * c.qmax + 1
    if c.model == MODEL_UNIFORM:
        return np.ones(n, dtype=np.float64)
    return laplace_frequencies(c.qmax, c.param)


def _model(c: TensorCoding):
    import constriction

    return constriction.stream.model.Categorical(_probabilities(c), perfect=False)


def _decay_bits(sym: np.ndarray, qmax: int) -> np.ndarray:
    """Estimated bits of the symbols under each decay of the table: element p - 1 for LAPLACE_PARAMS[p]."""
    mags = np.bincount(np.abs(sym).ravel())
    d = np.nonzero(mags)[0]
    counts = mags[d].astype(np.float64)
    # log2 p(k) = |k| log2 r - log2(2 (1 - r^(qmax+1)) / (1 - r) - 1), floored at constriction's
    # smallest probability; only the magnitudes present enter the sum, so this is cheap for any qmax.
    norm = np.log2(2 * (1 - _DECAYS ** (qmax + 1)) / (1 - _DECAYS) - 1)
    logp = np.maximum(d[None, :] * np.log2(_DECAYS)[:, None] - norm[:, None], -24.0)
    return -(logp @ counts)


def choose_model(sym: np.ndarray, qmax: int) -> tuple[int, int, float]:
    """The cheapest (model, param) for these symbols and its estimated cost in bits."""
    n = 2 * qmax + 1
    best = (MODEL_UNIFORM, 0, sym.size * np.log2(n))
    if sym.size == 0 or qmax == 0:
        return best
    bits = _decay_bits(sym, qmax)
    p = int(np.argmin(bits))  # the first of equal decays (neighbours near r = 1 coincide)
    if bits[p] < best[2]:
        best = (MODEL_LAPLACE, LAPLACE_PARAMS[p + 1], float(bits[p]))
    return best


# ---- the genesis input layer's decay, graded by frequency (version 5) -------------------------------------------


def frequency_groups(columns: int) -> np.ndarray:
    """The encoding group of each column of the genesis input layer: 0 for the two coordinates, i + 1 for
    frequency i's four (sin and cos of y and x; model.axis_columns' layout)."""
    j = np.arange(columns)
    return np.where(j < 2, 0, 1 + (j - 2) // 4)


def graded_indices(p, slope, groups: int) -> np.ndarray:
    """The decay index of each encoding group (the last axis): p + floor(slope * g / 4), held within the table.
    p and slope may be arrays that broadcast (the encoder's search)."""
    return np.clip(p + (slope * np.arange(groups)) // 4, 1, 255)


_SLOPES = (-64, 63)  # what the encoder searches: up to 16 table steps (an octave) a frequency


def _graded_totals(per: np.ndarray, slopes: np.ndarray) -> np.ndarray:
    """Bits of the graded tensor for each slope (rows) and decay index p = 1 … 255 (columns); `per` is each
    group's bits under each decay."""
    groups = per.shape[0]
    idx = graded_indices(np.arange(1, 256)[None, :, None], slopes[:, None, None], groups) - 1
    return per[np.arange(groups), idx].sum(axis=-1)


def choose_graded(sym: np.ndarray, qmax: int) -> tuple[int, int, int, float]:
    """choose_model for the genesis input layer's symbols (out, columns), with a decay slope across the
    encoding's frequencies where it saves more than its record's byte: (model, param, slope, bits).

    A fitted input layer's weights shrink with frequency (natural images have little energy at high
    frequencies, and the layer's weight decay pulls the unused ones to zero): the mean magnitude fell ~5x from
    the lowest to the highest frequency on 256x256 crops, and a slope saved 0.5-3 % of the layer's bits."""
    model, param, bits = choose_model(sym, qmax)
    g = frequency_groups(sym.shape[1])
    groups = int(g[-1]) + 1 if g.size else 0
    if model != MODEL_LAPLACE or groups < 2:
        return model, param, 0, bits
    per = np.stack([_decay_bits(sym[:, g == k], qmax) for k in range(groups)])  # groups x decays
    # Every 4th slope, then the 7 around the best of those (a tenth of the rate control's time where every slope
    # took 3x as long; the bits are smooth in the slope).
    coarse = np.arange(_SLOPES[0], _SLOPES[1] + 1, 4)
    best = coarse[np.argmin(_graded_totals(per, coarse).min(axis=1))]
    fine = np.arange(max(best - 3, _SLOPES[0]), min(best + 3, _SLOPES[1]) + 1)
    total = _graded_totals(per, fine)
    s, i = np.unravel_index(np.argmin(total), total.shape)
    if total[s, i] + 8 < bits and fine[s]:
        return MODEL_LAPLACE, LAPLACE_PARAMS[i + 1], int(fine[s]), float(total[s, i])
    return model, param, 0, bits


def _tensor_models(c: TensorCoding, columns: int):
    """(column mask or None, model) for each batch of a tensor's symbols, in stream order."""
    if not c.slope:
        return [(None, _model(c))]
    g = frequency_groups(columns)
    ps = graded_indices(LAPLACE_INDEX[c.param], c.slope, int(g[-1]) + 1)
    return [(g == k, _model(TensorCoding(c.step, c.qmax, MODEL_LAPLACE, LAPLACE_PARAMS[p]))) for k, p in enumerate(ps)]


# ---- the arrangement of a sine layer's neurons (version 3) ----------------------------------------------------


def _rows(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A layer as one row per neuron: [bias, weight row...]."""
    return np.concatenate([bias.reshape(-1, 1), weight.reshape(bias.size, -1)], axis=1).astype(np.int64)


def _layer(rows: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """_rows' inverse, in the shapes of `weight` and `bias`."""
    return rows[:, 1:].reshape(weight.shape), rows[:, 0].reshape(bias.shape)


def _keys(weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each neuron's key (its row) negated where needed to start (first non-zero) positive; the signs
    (-1 where negated; +1 for an all-zero key, which has no sign to code)."""
    keys = _rows(weight, bias)
    nz = keys != 0
    first = keys[np.arange(len(keys)), nz.argmax(axis=1)]
    signs = np.where(first < 0, -1, 1)
    return keys * signs[:, None], signs


def _classes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct keys (sorted: the canonical order) and each neuron's class among them (np.unique(axis=0)'s
    result, a few times faster: a lexicographic sort, first column first)."""
    order = np.lexsort(keys.T[::-1])
    ranked = keys[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = np.any(ranked[1:] != ranked[:-1], axis=1)
    cls = np.empty(len(keys), dtype=np.int64)
    cls[order] = np.cumsum(first) - 1
    return ranked[first], cls


def canonical(tensors: list[np.ndarray], layers) -> list[np.ndarray]:
    """The same network with every sine layer's neurons made positive and sorted by key (new arrays).

    `layers` are (weight, bias, next weight) tensor indices (Architecture.sine_layers); weights are (out, in)."""
    out = [np.asarray(t, dtype=np.int64).copy() for t in tensors]
    for w, b, nxt in layers:  # in order: a layer's keys hold its columns, which the layer before arranged
        n = out[b].size
        keys, signs = _keys(out[w], out[b])
        order = np.argsort(_classes(keys)[1], kind="stable")
        out[w], out[b] = _layer(keys[order], out[w], out[b])
        nw = out[nxt].reshape(-1, n) * signs[None, :]
        out[nxt] = nw[:, order].reshape(out[nxt].shape)
    return out


def arrangement_bits(tensors: list[np.ndarray], layers) -> float:
    """Bits the arrangements carry: log2 of the distinct orders (n! over ties) plus a sign a non-zero neuron."""
    bits = 0.0
    for w, b, _ in layers:
        keys, _ = _keys(tensors[w], tensors[b])
        _, cls = _classes(keys)
        counts = np.bincount(cls)
        bits += (math.lgamma(len(cls) + 1) - sum(math.lgamma(m + 1) for m in counts)) / math.log(2)
        bits += int(np.count_nonzero(np.any(keys != 0, axis=1)))
    return bits


def untied_arrangement_bits(widths) -> float:
    """arrangement_bits of layers of these widths when no neurons tie and none is all zero (the usual case):
    what the rate control can count on before the weights are quantised."""
    return sum(math.lgamma(n + 1) / math.log(2) + n for n in widths)


def _choice_model(counts: np.ndarray):
    """The model of which class comes next: proportional to the neurons left in each (those with any);
    None when one class is left (nothing to code)."""
    import constriction

    left = counts[counts > 0]
    if len(left) == 1:
        return None
    if np.all(left == 1):
        return constriction.stream.model.Uniform(len(left))
    return constriction.stream.model.Categorical(left.astype(np.float64), perfect=False)


def _lehmer_models(n: int):
    """The models of n distinct neurons' order, positions 0 … n-2 (the last has one choice): Uniform(n - p)."""
    import constriction

    return constriction.stream.model.Uniform(), (n - np.arange(n - 1)).astype(np.int32)


def _pop_arrangement(coder, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The layer (in canonical form) in an arrangement decoded from `coder`'s stack (the encoder)."""
    import constriction

    keys = _rows(weight, bias)
    distinct, cls = _classes(keys)
    n = len(keys)
    if len(distinct) == n:  # no ties (the usual case): the models do not depend on the choices, so one call
        left = list(range(n))
        order = [left.pop(k) for k in (coder.decode(*_lehmer_models(n)) if n > 1 else ())] + left
    else:
        counts = np.bincount(cls, minlength=len(distinct))
        order = []
        for _ in range(n):  # which class comes next, among the classes with neurons left
            model = _choice_model(counts)
            c = np.flatnonzero(counts)[int(coder.decode(model)) if model else 0]
            counts[c] -= 1
            order.append(c)
    rows = distinct[order]
    signed = np.flatnonzero(np.any(rows != 0, axis=1))
    if signed.size:
        flips = coder.decode(constriction.stream.model.Uniform(2), signed.size)
        rows[signed] *= 1 - 2 * flips.astype(np.int64)[:, None]
    return _layer(rows, weight, bias)


def _push_arrangement(coder, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """_pop_arrangement's inverse (the decoder): encode the stored rows' arrangement back onto the stack;
    returns the layer in canonical form."""
    import constriction

    keys, signs = _keys(weight, bias)
    signed = np.flatnonzero(np.any(keys != 0, axis=1))
    if signed.size:  # popped last, so pushed first
        coder.encode_reverse((signs[signed] < 0).astype(np.int32), constriction.stream.model.Uniform(2))
    distinct, cls = _classes(keys)
    n = len(cls)
    if len(distinct) == n and n > 1:  # no ties: position p's choice is its class's rank among those left
        earlier_below = np.tril(cls[None, :] < cls[:, None], -1).sum(axis=1)
        coder.encode_reverse((cls - earlier_below)[:-1].astype(np.int32), *_lehmer_models(n))
    elif len(distinct) < n:
        counts = np.bincount(cls, minlength=len(distinct))
        choices = []
        for c in cls:  # each position's model, as the encoder had it
            choices.append((int(np.count_nonzero(counts[:c])), _choice_model(counts)))
            counts[c] -= 1
        for k, model in reversed(choices):
            if model:
                coder.encode_reverse(np.array([k], dtype=np.int32), model)
    return _layer(distinct[np.sort(cls)], weight, bias)


def encode(tensors: list[np.ndarray], codings: list[TensorCoding], layers=()) -> bytes:
    """Entropy code integer symbol arrays (each within its coding's [-qmax, qmax]).

    With `layers` (Architecture.sine_layers(): version 3) the network is stored in canonical form with
    each layer's rows in an arrangement that carries stack bits; decode() with the same layers returns
    the canonical form (the same network). A coding with a decay slope (version 5) needs its tensor as a
    matrix: its symbols go column group by column group (_tensor_models)."""
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    tensors = canonical(tensors, layers) if layers else list(tensors)
    weight_of = {b: w for w, b, _ in layers}
    # ANS is a stack: encode in reverse so that the decoder reads tensors in bitstream order. A layer's
    # arrangement is taken after the tensors behind it are on the stack, before its bias and weight.
    for i in reversed(range(len(tensors))):
        if i in weight_of:
            w = weight_of[i]
            tensors[w], tensors[i] = _pop_arrangement(coder, tensors[w], tensors[i])
        sym, c = tensors[i], codings[i]
        if sym.size and c.qmax:  # qmax 0: every symbol is 0, nothing to code
            if c.slope and sym.ndim != 2:
                raise ValueError("a coding with a decay slope needs its tensor as a matrix")
            for cols, model in reversed(_tensor_models(c, sym.shape[-1])):
                part = sym if cols is None else sym[:, cols]
                coder.encode_reverse((part.ravel() + c.qmax).astype(np.int32), model)
    return coder.get_compressed().astype("<u4").tobytes()


def decode_file(f) -> list[np.ndarray]:
    """The symbols of every tensor of a parsed file (a bitstream.NifFile), flat, in bitstream order; FormatError
    where its stream does not hold exactly those tensors."""
    arch = f.header.arch
    sizes = [math.prod(shape) for _, shape in arch.tensor_shapes()]
    return decode(f.stream, f.codings, sizes, arch.sine_layers() if f.version >= 3 else (), arch.pe_dim)


def decode(stream: bytes, codings: list[TensorCoding], sizes: list[int], layers=(), columns: int = 0) -> list[np.ndarray]:
    """Symbol arrays (flat) of the tensors; with `layers`, version 3's canonical form (see encode). `columns`:
    the first tensor's (the genesis input layer's), which a decay slope needs."""
    import constriction

    if any(c.slope and (columns < 1 or n % columns) for c, n in zip(codings, sizes)):
        raise ValueError("a coding with a decay slope needs its tensor's column count")
    words = np.frombuffer(stream, dtype="<u4").astype(np.uint32)
    weight_of = {b: w for w, b, _ in layers}
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        out = []
        for i, (c, n) in enumerate(zip(codings, sizes)):
            if not (n and c.qmax):
                sym = np.zeros(n, dtype=np.int32) + c.qmax
            elif c.slope:
                sym = np.empty((n // columns, columns), dtype=np.int32)
                for cols, model in _tensor_models(c, columns):
                    sym[:, cols] = coder.decode(model, n // columns * int(cols.sum())).reshape(n // columns, -1)
                sym = sym.ravel()
            else:
                sym = coder.decode(_model(c), n)
            out.append(sym.astype(np.int64) - c.qmax)
            if i in weight_of and n:
                w = weight_of[i]
                out[w], out[i] = _push_arrangement(coder, out[w], out[i])
    except (ValueError, RuntimeError, AssertionError) as e:  # constriction reports bad data this way
        raise FormatError(f"corrupt weight stream: {e}") from e
    # The encoder's coder starts empty, so the decoder's ends empty: anything left means the symbols were read
    # against models or sizes other than the writer's (a desynchronised stream decodes to a wrong network silently).
    if not coder.is_empty():
        raise FormatError(f"corrupt weight stream: {coder.num_valid_bits()} bits left after the last tensor")
    return out
