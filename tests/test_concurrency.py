"""Concurrency and determinism: threads, DataLoader worker processes, repeated open/load, fresh processes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import pillow_nif
from pillow_nif import bitstream as bs
from pillow_nif import entropy


def built_file(arch, mode, colour, size, seed=1, qmax=7) -> bytes:
    """A valid file through bitstream.dumps: random symbols entropy coded (no fitting: fast)."""
    rng = np.random.default_rng(seed)
    codings, syms = [], []
    for i, (_, shape) in enumerate(arch.tensor_shapes()):
        model = bs.MODEL_LAPLACE if i % 2 else bs.MODEL_UNIFORM
        codings.append(bs.TensorCoding(2**-5, qmax, model, 40000 if model == bs.MODEL_LAPLACE else 0))
        syms.append(rng.integers(-qmax, qmax + 1, size=int(np.prod(shape))))
    header = bs.Header(size[0], size[1], mode, colour, arch)
    return bs.dumps(bs.NifFile(header, codings, entropy.encode(syms, codings, arch.sine_layers())))


@pytest.fixture(scope="module")
def files(small_nif, tmp_path_factory):
    """Paths of four different files: the encoder's 97x61 RGB and three hand-built ones (other modes)."""
    d = tmp_path_factory.mktemp("conc")
    made = {
        "rgb-mod.nif": built_file(bs.Architecture(3, (24, 16), 4, 1.4, 30.0, (8,), 2, 30.0, 2.0), "RGB", 1, (80, 48)),
        "l.nif": built_file(bs.Architecture(1, (16, 8), 3, 1.4, 30.0), "L", 0, (33, 65), 2),
        "rgba.nif": built_file(bs.Architecture(4, (12,), 2, 2.0, 20.0, (4, 4), 1, 10.0, 1.0), "RGBA", 1, (40, 40), 3),
    }
    paths = [small_nif]
    for name, data in made.items():
        (d / name).write_bytes(data)
        paths.append(d / name)
    return paths


def load(path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        return np.asarray(im).copy()


@pytest.fixture(scope="module")
def serial(files):
    return [load(p) for p in files]


def test_eight_threads_decode_the_same_and_different_files_as_serially(files, serial):
    start = threading.Barrier(8)

    def work(t):
        start.wait()  # all at once
        out = []
        for r in range(3):
            i = (t + r) % len(files) if t % 2 else 0  # even threads: all the same file; odd: a rotation
            if (t + r) % 3 == 0:
                arr = np.asarray(pillow_nif.decode(files[i].read_bytes(), device="cpu", backend="torch"))
            else:
                arr = load(files[i])
            out.append((i, arr))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    assert sum(len(r) for r in results) == 24
    for r in results:
        for i, arr in r:
            assert np.array_equal(arr, serial[i])


# A training script's pattern: decode in the main process (torch's thread pools are up), then read the same files in
# DataLoader workers forked from it. CI once saw such workers never answer (1 run in about 55), forked from pytest's
# own process just after the eight threads above had exited; the suite then took 64 minutes, not 2 (likely: pytest's
# traceback kept the timed-out loader, so its workers lived on). So the workers fork from a fresh process (a user's
# state), whose process group the guard can kill whole; a stuck worker first prints its Python stack (faulthandler).
FORK_SCRIPT = """
import faulthandler, hashlib, sys
import numpy as np, torch
from PIL import Image
from torch.utils.data import DataLoader
import pillow_nif  # noqa: F401

class NifDataset:
    def __init__(self, paths):
        self.paths = paths * 3
    def __len__(self):
        return len(self.paths)
    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return i, np.asarray(im.convert("RGBA"))

def say_where_if_stuck(_):
    faulthandler.dump_traceback_later(120, exit=False, file=sys.__stderr__)

paths = sys.argv[1:]
for p in paths:
    Image.open(p).load()
loader = DataLoader(NifDataset(paths), batch_size=None, num_workers=2, multiprocessing_context="fork",
                    worker_init_fn=say_where_if_stuck)
for i, arr in loader:
    assert isinstance(arr, torch.Tensor), type(arr)
    print(int(i), hashlib.sha256(np.ascontiguousarray(arr.numpy()).tobytes()).hexdigest())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork start method is the Linux default")
def test_dataloader_fork_workers_give_identical_arrays(files, serial):
    pytest.importorskip("torch")
    rgba = [Image.fromarray(a).convert("RGBA") for a in serial]
    expected = [_digest(np.asarray(im)) for im in rgba] * 3
    proc = subprocess.Popen([sys.executable, "-c", FORK_SCRIPT, *map(str, files)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)  # a guard against a hang, not a speed limit: 2 s here
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # the workers too, not left orphaned
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    assert proc.returncode == 0, f"the script failed, or hung and was killed ({proc.returncode}):\n{err[-6000:]}"
    got = dict(line.split() for line in out.splitlines())
    assert sorted(map(int, got)) == list(range(len(expected)))
    for i, digest in got.items():
        assert digest == expected[int(i)], files[int(i) % len(files)]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_no_memory_or_descriptor_growth_over_many_open_load_cycles(files):
    path = files[0]  # the encoder's 97x61 RGB: 17 KiB of pixels, a network of a few thousand parameters
    data = path.read_bytes()

    def cycle():
        with Image.open(path) as im:
            im.load()
        with Image.open(io.BytesIO(data)) as im:
            im.thumbnail((16, 16))
        pillow_nif.decode(data)

    for _ in range(30):  # warm up: imports, allocator pools, torch's caches
        cycle()
    fds, rss = len(os.listdir("/proc/self/fd")), _rss_mib()
    for _ in range(300):
        cycle()
    growth = _rss_mib() - rss
    assert len(os.listdir("/proc/self/fd")) <= fds
    # Steady state is flat (0.03 MiB here); keeping one decoded image, file or network per cycle would be 5+ MiB.
    assert growth < 4, f"RSS grew by {growth:.1f} MiB over 300 cycles"


def _digest(arr) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def test_decoding_is_deterministic_across_runs_threads_and_processes(files, serial):
    torch = pytest.importorskip("torch")
    again = [load(p) for p in files]
    assert all(np.array_equal(a, b) for a, b in zip(again, serial))
    threads = torch.get_num_threads()
    try:  # the thread count changes how BLAS splits the work, never a pixel
        torch.set_num_threads(2 if threads == 1 else 1)
        assert all(np.array_equal(load(p), a) for p, a in zip(files, serial))
    finally:
        torch.set_num_threads(threads)
    # a fresh process (other addresses, other allocator state) gives the same pixels
    code = (
        "import sys, hashlib, numpy as np, pillow_nif; from PIL import Image\n"
        "for p in sys.argv[1:]:\n"
        "    print(hashlib.sha256(np.ascontiguousarray(np.asarray(Image.open(p))).tobytes()).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [_digest(a) for a in serial]
