import hashlib

import numpy as np
import pytest

from pillow_nif import entropy
from pillow_nif.bitstream import MODEL_LAPLACE, MODEL_UNIFORM, FormatError, TensorCoding


def test_laplace_table_is_integer_exact_and_stable():
    # The table is the contract between encoder and decoder: its bytes must never change.
    t = entropy.laplace_frequencies(100, 50000)
    assert t.dtype == np.float64 and np.all(t == np.round(t)) and t[100] == 2.0**40
    assert np.array_equal(t, t[::-1])
    assert hashlib.sha256(t.tobytes()).hexdigest()[:16] == hashlib.sha256(entropy.laplace_frequencies(100, 50000).tobytes()).hexdigest()[:16]
    assert t[101] == (2**40 * 50000) >> 16


@pytest.mark.parametrize("model", [MODEL_UNIFORM, MODEL_LAPLACE])
def test_round_trip(model):
    rng = np.random.default_rng()
    tensors = [np.clip(np.round(rng.laplace(0, s, n)), -q, q).astype(np.int64) for s, n, q in ((3, 500, 20), (0.5, 37, 4), (40, 1000, 300))]
    codings = [TensorCoding(0.1, q, model, 60000 if model else 0) for q in (20, 4, 300)]
    stream = entropy.encode(tensors, codings)
    out = entropy.decode(stream, codings, [t.size for t in tensors])
    for a, b in zip(tensors, out):
        assert np.array_equal(a, b)


def test_choose_model_prefers_laplace_for_peaked_weights_and_estimates_the_real_size():
    rng = np.random.default_rng(1)
    sym = np.clip(np.round(rng.laplace(0, 2, 5000)), -50, 50).astype(np.int64)
    model, param, bits = entropy.choose_model(sym, 50)
    assert model == MODEL_LAPLACE
    real = 8 * len(entropy.encode([sym], [TensorCoding(1.0, 50, model, param)]))
    assert bits < sym.size * np.log2(101)
    assert abs(real - bits) < 0.02 * bits + 64


def test_empty_and_degenerate_tensors():
    codings = [TensorCoding(1.0, 0, MODEL_UNIFORM, 0), TensorCoding(1.0, 3, MODEL_LAPLACE, 1000)]
    tensors = [np.zeros(10, dtype=np.int64), np.zeros(0, dtype=np.int64)]
    out = entropy.decode(entropy.encode(tensors, codings), codings, [10, 0])
    assert np.array_equal(out[0], tensors[0]) and out[1].size == 0


def test_garbage_stream_is_a_format_error_or_decodes():
    codings = [TensorCoding(1.0, 7, MODEL_LAPLACE, 30000)]
    for stream in (b"", b"\x00\x00\x00\x00", b"\xff" * 8):
        try:
            out = entropy.decode(stream, codings, [100])
            assert np.all(np.abs(out[0]) <= 7)
        except FormatError:
            pass
