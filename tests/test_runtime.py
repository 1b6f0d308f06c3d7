"""glr.runtime: the machine's answers (real or named by GLR_MACHINE) and the precision each
`train.precision` value computes in, on every kind of machine, tested on this one."""

from __future__ import annotations

import pytest
import torch

from glr import runtime

CPU, CUDA = torch.device("cpu"), torch.device("cuda:0")


def test_glr_machine_names_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLR_MACHINE", "plain-cpu")
    assert (runtime.cuda_available(), runtime.cpu_has_fast_bf16()) == (False, False)
    monkeypatch.setenv("GLR_MACHINE", "bf16-cpu")
    assert (runtime.cuda_available(), runtime.cpu_has_fast_bf16()) == (False, True)
    assert runtime.setup_distributed().device == CPU
    for detect in ("detect", ""):
        monkeypatch.setenv("GLR_MACHINE", detect)
        assert runtime.forced_machine() is None
    monkeypatch.delenv("GLR_MACHINE")
    assert runtime.forced_machine() is None
    monkeypatch.setenv("GLR_MACHINE", "amx")
    with pytest.raises(ValueError, match=r"GLR_MACHINE='amx': expected detect, plain-cpu, "
                                         r"bf16-cpu"):
        runtime.cpu_has_fast_bf16()


@pytest.mark.parametrize(("machine", "device", "precision", "expected"), [
    ("plain-cpu", CPU, "auto", "fp32"),
    ("bf16-cpu", CPU, "auto", "bf16"),
    ("plain-cpu", CPU, "fp32", "fp32"),
    ("bf16-cpu", CPU, "fp32", "fp32"),
    ("plain-cpu", CPU, "bf16", "bf16"),
    ("bf16-cpu", CUDA, "auto", "fp16"),
    ("plain-cpu", CUDA, "fp32", "fp32"),
    ("plain-cpu", CUDA, "bf16", "bf16"),
])
def test_resolved_precision_and_its_name(monkeypatch, machine, device, precision, expected):
    monkeypatch.setenv("GLR_MACHINE", machine)
    assert runtime.resolve_precision(device, precision) == expected
    # the logs' `precision: …` line starts with the resolved name (train's metrics use it)
    assert runtime.precision_name(device, precision).split()[0] == expected


def test_bf16_named_on_a_cpu_without_it_says_it_is_emulated(monkeypatch) -> None:
    monkeypatch.setenv("GLR_MACHINE", "plain-cpu")
    assert "emulates bfloat16" in runtime.precision_name(CPU, "bf16")
    monkeypatch.setenv("GLR_MACHINE", "bf16-cpu")
    assert "emulates" not in runtime.precision_name(CPU, "bf16")
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        runtime.resolve_precision(CPU, "fp16")


@pytest.mark.parametrize(("machine", "precision", "dtype"), [
    ("plain-cpu", "auto", torch.float32),
    ("bf16-cpu", "auto", torch.bfloat16),
    ("bf16-cpu", "fp32", torch.float32),
    ("plain-cpu", "bf16", torch.bfloat16),
])
def test_cpu_autocast_computes_in_the_resolved_precision(monkeypatch, machine, precision, dtype):
    monkeypatch.setenv("GLR_MACHINE", machine)
    autocast, scaler = runtime.precision_context(CPU, precision)
    assert scaler is None  # bfloat16 has float32's exponent range: no loss scaling on a CPU
    with autocast:
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == dtype


PIN_PROBE = """
import os, subprocess, sys, torch
from glr.runtime import cpu_kernels_name, pin_cpu_kernels
pin_cpu_kernels(sys.argv[1], int(sys.argv[2]))
said = cpu_kernels_name(sys.argv[1])
probe = "import os; print(os.environ.get('ONEDNN_MAX_CPU_ISA'))"
child = subprocess.run([sys.executable, "-c", probe], capture_output=True,
                       text=True).stdout.strip()
print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), child, said, sep="|")
"""


@pytest.mark.parametrize(("kernels", "threads"), [("avx2", 2), ("avx2", 1), ("native", 0)])
def test_pinned_cpu_kernels_and_threads_in_a_fresh_process(kernels, threads):
    """`train.cpu_kernels` / `cpu_threads` as a stage applies them, first thing in a fresh
    process (the libraries read their instruction set once): avx2 gives AVX2 kernels (or the
    portable DEFAULT ones on a CPU without AVX2), and the setting reaches child processes."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    result = subprocess.run([sys.executable, "-c", PIN_PROBE, kernels, str(threads)], env=env,
                            capture_output=True, text=True, check=True)
    capability, used, child, said = result.stdout.strip().split("|")
    if kernels == "avx2":
        assert capability in ("AVX2", "DEFAULT") and child == "AVX2"
        assert said.startswith(f"{capability} kernels (train.cpu_kernels avx2)")
    else:
        assert child == "None"  # native: the environment is left as it was
    if threads:
        assert int(used) == threads and said.endswith(f"{threads} thread(s)")
    assert "already runs" not in result.stderr


def test_native_bf16_does_not_count_where_onednn_is_capped_below_it(monkeypatch) -> None:
    monkeypatch.delenv("GLR_MACHINE")  # detect: the cap decides before the CPU is asked
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert runtime.cpu_has_fast_bf16() is False
    monkeypatch.setenv("GLR_MACHINE", "bf16-cpu")  # a named machine wins
    assert runtime.cpu_has_fast_bf16() is True
    with pytest.raises(ValueError, match="cpu_kernels must be one of native, avx2"):
        runtime.pin_cpu_kernels("sse", 0)
