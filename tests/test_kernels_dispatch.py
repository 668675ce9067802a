"""Backend selection in lmport/kernels/__init__.py: C++ kernels (lmport.kernels.cpu) or the reference on CPU, Triton when forced,
clear errors otherwise."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.kernel_helpers import DEVICE, enable_triton_interpreter

enable_triton_interpreter()

from lmport import kernels  # noqa: E402
from lmport.kernels import reference  # noqa: E402


@pytest.fixture
def backend():
    before = kernels._backend
    yield kernels.set_backend
    kernels.set_backend(before)


needs_interpreter = pytest.mark.skipif(DEVICE.type == "cuda", reason="Triton on CPU tensors needs the interpreter")


@needs_interpreter
def test_cpu_tensors_run_the_cpu_kernels_or_the_reference_unless_triton_is_forced(backend):
    """silu_and_mul dispatches through _impl_cpu: "auto" picks the C++ kernels (which fall back to the reference
    themselves if they cannot be built), "torch" the pure reference."""
    x = torch.randn(2, 8)
    backend("auto")
    auto = kernels._cpu() if kernels.get_backend() == "auto" else reference  # LMPORT_KERNEL_BACKEND may force one
    assert kernels._impl_cpu(x, "activation") is auto
    assert kernels._impl(x, "activation") is reference  # what the kernels without a C++ version run (prefill, ...)
    backend("torch")
    assert kernels._impl_cpu(x, "activation") is reference
    assert kernels._impl(x, "activation") is reference
    backend("triton")
    assert kernels._impl(x, "activation").__name__ == "lmport.kernels.triton_activation"
    torch.testing.assert_close(kernels.silu_and_mul(x), reference.silu_and_mul(x))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU")
def test_cuda_tensors_run_triton_unless_torch_is_forced(backend):
    x = torch.randn(2, 8, device=DEVICE)
    backend("auto")
    assert kernels._impl(x, "activation").__name__ == "lmport.kernels.triton_activation"
    torch.testing.assert_close(kernels.silu_and_mul(x), reference.silu_and_mul(x))
    backend("torch")
    assert kernels._impl(x, "activation") is reference


@needs_interpreter
def test_forcing_triton_on_cpu_without_the_interpreter_is_a_clear_error(backend, monkeypatch):
    backend("triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.silu_and_mul(torch.randn(2, 8))


def test_use_backend_overrides_the_default_for_its_block_and_thread_only(backend):
    backend("torch")
    with kernels.use_backend("triton"):
        assert kernels.get_backend() == "triton"
        with kernels.use_backend("torch"):
            assert kernels.get_backend() == "torch"
        assert kernels.get_backend() == "triton"
        other: list[str] = []
        thread = threading.Thread(target=lambda: other.append(kernels.get_backend()))
        thread.start()
        thread.join()
        assert other == ["torch"]  # another thread keeps the process default
    assert kernels.get_backend() == "torch"
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        with kernels.use_backend("cuda"):
            pass


def test_unknown_backend_is_rejected_by_name(backend):
    with pytest.raises(ValueError, match="kernel_backend must be one of auto, triton, torch; got 'cuda'"):
        backend("cuda")


def test_environment_variable_sets_the_default_and_is_validated():
    code = "from lmport import kernels; kernels.set_backend('auto'); print(kernels.get_backend())"
    root = Path(__file__).resolve().parents[1]
    env = {"LMPORT_KERNEL_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    run = dict(env=env, cwd=root, capture_output=True, text=True, timeout=120)
    done = subprocess.run([sys.executable, "-c", code], **run)
    assert done.stdout.strip() == "torch", done.stderr
    env["LMPORT_KERNEL_BACKEND"] = "gpu"
    done = subprocess.run([sys.executable, "-c", code], **run)
    assert done.returncode != 0 and "LMPORT_KERNEL_BACKEND must be one of" in done.stderr
