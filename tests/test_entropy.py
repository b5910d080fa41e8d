import hashlib
import math

import numpy as np
import pytest

from pillow_nif import entropy
from pillow_nif.bitstream import MODEL_LAPLACE, MODEL_UNIFORM, Architecture, FormatError, TensorCoding


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



def test_a_stream_read_against_other_tensors_than_its_writers_is_refused():
    """A desynchronised stream (another writer's sizes or models) must not decode to a wrong network silently: the
    writer's coder starts empty, so the reader's must end so (docs/FORMAT.md)."""
    rng = np.random.default_rng(3)
    tensors = [np.clip(np.round(rng.laplace(0, 3, n)), -20, 20).astype(np.int64) for n in (300, 40)]
    codings = [TensorCoding(0.1, 20, MODEL_LAPLACE, 60000)] * 2
    stream = entropy.encode(tensors, codings)
    assert all(np.array_equal(a, b) for a, b in zip(entropy.decode(stream, codings, [300, 40]), tensors))
    other_model = [codings[0], TensorCoding(0.1, 20, MODEL_LAPLACE, 30000)]
    for sizes, cods in (([300, 30], codings), ([300], codings[:1]), ([300, 40], other_model)):
        with pytest.raises(FormatError, match="left after the last tensor"):
            entropy.decode(stream, cods, sizes)
    with pytest.raises(FormatError, match="left after the last tensor"):  # a word too many
        entropy.decode(stream + (1).to_bytes(4, "little"), codings, [300, 40])

def _network_symbols(arch, seed):
    """Random symbols for every tensor of `arch`, with the cases an arrangement must survive: two neurons
    with the same key, one the negation of another, an all-zero neuron."""
    rng = np.random.default_rng(seed)
    syms = [np.clip(np.round(rng.laplace(0, 3, shape)), -20, 20).astype(np.int64) for _, shape in arch.tensor_shapes()]
    for w, b, _ in arch.sine_layers():
        if syms[b].size >= 4:
            syms[w][1], syms[b][1] = syms[w][0], syms[b][0]
            syms[w][2], syms[b][2] = -syms[w][0], -syms[b][0]
            syms[w][3], syms[b][3] = 0, 0
    return syms


ARCH = Architecture(3, (24, 12, 6), 3, 1.4, 30.0, (8, 4), 2, 30.0, 10.0)


@pytest.mark.parametrize("arch", [ARCH, Architecture(1, (5,), 2, 1.4, 30.0), Architecture(3, (1, 2), 1, 1.4, 30.0, (1,), 1, 30.0, 1.0)])
def test_arrangement_round_trips_to_the_canonical_network_and_carries_its_bits(arch):
    syms = _network_symbols(arch, 0)
    codings = [TensorCoding(0.1, 20, MODEL_LAPLACE, 50000)] * len(syms)
    plain = entropy.encode(syms, codings)
    arranged = entropy.encode(syms, codings, arch.sine_layers())
    out = entropy.decode(arranged, codings, [s.size for s in syms], arch.sine_layers())
    canon = entropy.canonical(syms, arch.sine_layers())
    assert all(np.array_equal(a.ravel(), b) for a, b in zip(canon, out))
    # The arrangement's bits come off the file, to the 32-bit word.
    saved = 8 * (len(plain) - len(arranged))
    assert abs(saved - entropy.arrangement_bits(syms, arch.sine_layers())) <= 64
    # Three neurons with one key (up to sign) carry no order among them, the all-zero one no sign: each of
    # the 5 layers claims log2(3!) + 1 bits less than its n! orders and 2^n signs.
    if arch is ARCH:
        full = sum(math.lgamma(n + 1) / math.log(2) + n for n in (*arch.widths, *arch.mod_widths))
        assert entropy.arrangement_bits(syms, arch.sine_layers()) == pytest.approx(full - 5 * (math.log2(6) + 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_canonical_form_is_the_same_network(seed):
    import torch

    from pillow_nif.model import NIF, pixel_grid

    syms = _network_symbols(ARCH, seed)
    canon = entropy.canonical(syms, ARCH.sine_layers())
    assert any(not np.array_equal(a, b) for a, b in zip(syms, canon))  # it did rearrange
    coords = pixel_grid(13, 11, dtype=torch.float64)
    outputs = []
    for tensors in (syms, canon):
        net = NIF(ARCH).double()
        with torch.no_grad():
            for (_, p), t in zip(net.named_tensors(), tensors):
                p.copy_(torch.from_numpy(t.reshape(p.shape) * 0.02))
            outputs.append(net.forward_points(coords))
    assert torch.allclose(outputs[0], outputs[1], rtol=0, atol=1e-9)


def _graded_symbols(rng, rows=40, freqs=10, qmax=60):
    """An input layer's symbols whose magnitudes shrink with frequency, as a fitted one's do."""
    scale = np.concatenate([[12.0, 12.0], np.repeat(12.0 * 0.8 ** np.arange(1, freqs + 1), 4)])
    return np.clip(np.round(rng.laplace(0, scale, (rows, scale.size))), -qmax, qmax).astype(np.int64)


def test_the_input_layers_decay_slope_is_chosen_where_it_pays_and_round_trips():
    rng = np.random.default_rng(3)
    sym = _graded_symbols(rng)
    model, param, bits = entropy.choose_model(sym, 60)
    gmodel, gparam, slope, gbits = entropy.choose_graded(sym, 60)
    assert gmodel == MODEL_LAPLACE and slope < 0 and gbits < bits - 8
    # Magnitudes shrink 0.8x a frequency: the decay index falls by 16 log2(1 / 0.8) ~ 5 a group, 4 per unit.
    assert -6 * 4 <= slope <= -4 * 4
    flat = np.clip(np.round(rng.laplace(0, 5.0, sym.shape)), -60, 60).astype(np.int64)
    assert entropy.choose_graded(flat, 60)[2] == 0  # nothing to win: no slope, no byte
    arch = Architecture(3, (40, 12), 10, 1.4, 30.0)
    syms = [sym] + [np.clip(np.round(rng.laplace(0, 3, s)), -20, 20).astype(np.int64) for _, s in arch.tensor_shapes()[1:]]
    codings = [TensorCoding(0.1, 60, gmodel, gparam, slope)] + [TensorCoding(0.1, 20, MODEL_LAPLACE, 50000)] * (len(syms) - 1)
    stream = entropy.encode(syms, codings, arch.sine_layers())
    out = entropy.decode(stream, codings, [s.size for s in syms], arch.sine_layers(), arch.pe_dim)
    canon = entropy.canonical(syms, arch.sine_layers())
    assert all(np.array_equal(a.ravel(), b) for a, b in zip(canon, out))
    # The estimate is the real size of the graded tensor's stream, and beats the ungraded one's.
    alone = 8 * len(entropy.encode([sym], codings[:1]))
    assert abs(alone - gbits) < 0.02 * gbits + 64
    assert alone < 8 * len(entropy.encode([sym], [TensorCoding(0.1, 60, model, param)]))
    with pytest.raises(ValueError, match="column count"):
        entropy.decode(stream, codings, [s.size for s in syms], arch.sine_layers())
