"""Kernel tooling: the Triton kernels lower to real H100 code (sm_90) without a GPU; the benchmark refuses clearly
where there is no GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmport.kernels import bench


@pytest.mark.slow
def test_every_kernel_compiles_for_the_h100():
    arch = 90  # the measured target; `python -m lmport.kernels.compile_check --arch 80` checks A100s by hand
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the kernel tests set it in-process
    env.update(OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "lmport.kernels.compile_check", "--arch", str(arch), "--verbose"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"all kernels compiled for sm_{arch}" in done.stdout
    # the attention kernels must pipeline their K/V gathers, and the fp16/bf16 prefill must use wgmma
    lines = done.stdout.splitlines()
    attention = [line for line in lines if "_decode_kernel" in line or "_prefill_kernel" in line]
    assert attention and all("async_copies=0" not in line for line in attention), done.stdout
    prefill = [line for line in attention if "_prefill_kernel" in line and "fp32" not in line]
    assert prefill and all("wgmma=True" in line for line in prefill), done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the benchmark runs for real on a GPU")
def test_benchmark_refuses_without_a_gpu(capsys):
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
