"""Entropy coding of quantised weights with constriction (the only module that uses it).

All tensors of a file share one ANS stream. Each tensor has its own i.i.d. model, either uniform
over [-qmax, qmax] or a two-sided geometric ("discrete Laplace") distribution p(k) ~ r^|k| with
r = param / 65536. The geometric table is built with integer arithmetic only, so the encoder and
any decoder, on any CPU, hand constriction bit-identical inputs and get the same coding tables.
"""

from __future__ import annotations

import numpy as np

from .bitstream import MODEL_LAPLACE, MODEL_UNIFORM, FormatError, TensorCoding

_ONE = 1 << 40  # table scale: f(k) = floor(2^40 r^|k|), exact in float64
# Candidate decays, dense near 1 where wide distributions need the resolution.
_PARAM_GRID = np.unique(np.clip(np.round(65536 * (1 - 2.0 ** -np.linspace(0.05, 15.9, 160))), 1, 65535)).astype(int)


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


def choose_model(sym: np.ndarray, qmax: int) -> tuple[int, int, float]:
    """The cheapest (model, param) for these symbols and its estimated cost in bits."""
    n = 2 * qmax + 1
    best = (MODEL_UNIFORM, 0, sym.size * np.log2(n))
    if sym.size == 0 or qmax == 0:
        return best
    mags = np.bincount(np.abs(sym).ravel())
    d = np.nonzero(mags)[0]
    counts = mags[d].astype(np.float64)
    r = _PARAM_GRID / 65536.0
    # log2 p(k) = |k| log2 r - log2(2 (1 - r^(qmax+1)) / (1 - r) - 1), floored at constriction's
    # smallest probability; only the magnitudes present enter the sum, so this is cheap for any qmax.
    norm = np.log2(2 * (1 - r ** (qmax + 1)) / (1 - r) - 1)
    logp = np.maximum(d[None, :] * np.log2(r)[:, None] - norm[:, None], -24.0)
    bits = -(logp @ counts)
    i = int(np.argmin(bits))
    if bits[i] < best[2]:
        best = (MODEL_LAPLACE, int(_PARAM_GRID[i]), float(bits[i]))
    return best


def encode(tensors: list[np.ndarray], codings: list[TensorCoding]) -> bytes:
    """Entropy code integer symbol arrays (each within its coding's [-qmax, qmax])."""
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    # ANS is a stack: encode in reverse so that the decoder reads tensors in bitstream order.
    for sym, c in reversed(list(zip(tensors, codings))):
        if sym.size and c.qmax:  # qmax 0: every symbol is 0, nothing to code
            coder.encode_reverse((sym.ravel() + c.qmax).astype(np.int32), _model(c))
    return coder.get_compressed().astype("<u4").tobytes()


def decode(stream: bytes, codings: list[TensorCoding], sizes: list[int]) -> list[np.ndarray]:
    import constriction

    words = np.frombuffer(stream, dtype="<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        out = []
        for c, n in zip(codings, sizes):
            sym = coder.decode(_model(c), n) if n and c.qmax else np.zeros(n, dtype=np.int32) + c.qmax
            out.append(sym.astype(np.int64) - c.qmax)
    except (ValueError, RuntimeError, AssertionError) as e:  # constriction reports bad data this way
        raise FormatError(f"corrupt weight stream: {e}") from e
    return out
