"""glr.runtime: the machine's answers (real or named by GLR_MACHINE) and the precision each
`train.precision` value computes in, on every kind of machine, tested on this one."""

from __future__ import annotations

import datetime

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


def test_fp32_on_cuda_turns_tf32_off_through_one_api() -> None:
    """`train.precision: fp32` on CUDA is IEEE float32: cuDNN's convolutions and cuBLAS get no
    TF32 (cuDNN's is on by default). Only torch's switches are touched: no GPU is needed."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch before 2.9: the legacy switches")
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        assert conv.fp32_precision == "tf32"  # torch's default
        autocast, scaler = runtime.precision_context(CUDA, "fp32")
        assert scaler is None and not isinstance(autocast, torch.autocast)
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


@pytest.mark.parametrize(("local_rank", "visible", "expected"), [
    (0, 1, 0), (3, 1, 0),  # one GPU exposed to each rank (SLURM --gpus-per-task=1)
    (0, 8, 0), (7, 8, 7),
])
def test_cuda_index_of_a_local_rank(local_rank, visible, expected) -> None:
    assert runtime.cuda_index(local_rank, visible) == expected


def test_more_ranks_than_gpus_and_srun_without_torchrun_are_one_line_errors() -> None:
    with pytest.raises(runtime.LaunchError, match=r"local rank 2 has no GPU of its own: 2 are "
                                                  r"visible on this node; start at most 2"):
        runtime.cuda_index(2, 2)
    with pytest.raises(runtime.LaunchError, match="no CUDA GPU"):
        runtime.cuda_index(0, 0)
    step = {"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2"}
    with pytest.raises(runtime.LaunchError, match="4 SLURM tasks without torchrun"):
        runtime.check_launcher(step)
    runtime.check_launcher({**step, "WORLD_SIZE": "32"})  # torchrun inside srun
    runtime.check_launcher({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"})  # sbatch -n 8 script
    runtime.check_launcher({"SLURM_NTASKS": "8"})  # a command in an `salloc -n 8` shell
    runtime.check_launcher({})


def test_the_process_group_waits_as_long_as_params_say(monkeypatch) -> None:
    """train.timeout_minutes reaches init_process_group (torch's nccl default: 10 minutes)."""
    calls = []
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(runtime.dist, "init_process_group",
                        lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(runtime.dist, "get_rank", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = runtime.setup_distributed(timeout_minutes=180)
    assert calls == [{"backend": "gloo", "timeout": datetime.timedelta(minutes=180)}]
    assert (env.rank, env.world, env.local_rank, env.device) == (1, 2, 1, CPU)


def test_cuda_algorithms_follow_the_params() -> None:
    """train.deterministic sets torch's determinism switches (and cuBLAS's workspace), which a
    GPU rerun needs for the same bytes; train.cudnn_benchmark excludes it."""
    import os

    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        assert "deterministic" in runtime.pin_cuda_algorithms(True, False)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == (saved[3] or ":4096:8")
        assert "benchmark" in runtime.pin_cuda_algorithms(False, True)
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        with pytest.raises(runtime.ParamsError, match="exclude each other"):
            runtime.pin_cuda_algorithms(True, True)
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:3]
        if saved[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_fp32_on_cuda_with_a_torch_before_the_new_flags(monkeypatch) -> None:
    """torch before 2.9 has only the legacy `allow_tf32` switches: those are turned off."""
    from types import SimpleNamespace

    matmul, cudnn = SimpleNamespace(allow_tf32=True), SimpleNamespace(allow_tf32=True)
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    runtime.exact_cuda_float32()
    assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)


def test_a_gpu_node_gives_each_local_rank_its_gpu_and_nccl(monkeypatch) -> None:
    """The CUDA branch of setup_distributed, forced on this machine: local rank 1 of a node
    with 2 visible GPUs takes cuda:1 and joins over nccl; a third local rank is refused."""
    calls, devices = [], []
    monkeypatch.setattr(runtime, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(runtime.dist, "init_process_group",
                        lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(runtime.dist, "get_rank", lambda: 3)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = runtime.setup_distributed(timeout_minutes=60)
    assert devices == [torch.device("cuda", 1)] and env.device == torch.device("cuda", 1)
    assert calls == [{"backend": "nccl", "timeout": datetime.timedelta(minutes=60)}]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(runtime.LaunchError, match="local rank 2 has no GPU of its own"):
        runtime.setup_distributed()


def test_cpus_and_local_processes_and_the_workers_they_hold(monkeypatch) -> None:
    import os

    assert 1 <= runtime.available_cpus() <= (os.cpu_count() or 1)
    assert runtime.local_processes({}) == 1
    assert runtime.local_processes({"LOCAL_WORLD_SIZE": "8"}) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert runtime.local_processes() == 4
    # the authors' 8 ranks × 8 workers on a 32-core node: 4 each; more ranks than CPUs: 0
    assert [runtime.worker_fit(local, cpus) for local, cpus in
            [(8, 32), (1, 2), (8, 128), (4, 2)]] == [4, 2, 16, 0]
    assert runtime.host_memory_bytes() > 2 ** 28
