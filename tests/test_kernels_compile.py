"""The Triton kernels compile for sm_90 (H100 / H200) with the installed Triton, without a GPU (compile_sm90.py).

The kernel tests run in the interpreter here, which never runs Triton's compiler: a kernel it accepts can still
fail to compile on every GPU, as the decoder did with Triton 3.6."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

# Not imported here: the kernel tests' modules set TRITON_INTERPRET before this process first imports triton.
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}  # an empty cache: compile, do not look kernels up
    env.pop("TRITON_INTERPRET", None)
    script = pathlib.Path(__file__).with_name("compile_sm90.py")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("compiled ") == 9, r.stdout
