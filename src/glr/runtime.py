"""Where a stage runs and how it computes: its torchrun rank and device, the CPU kernels and
threads, the CUDA algorithms, and the precision.

`train`, `extract` and `glr query` share these: under torchrun each process joins the process
group (nccl on GPU, gloo on CPU; collectives wait `train.timeout_minutes`); with `processes > 1`
and no torchrun around, a stage relaunches itself under torchrun. A launch that cannot work
(more local ranks than GPUs, several `srun` tasks without torchrun) is a one-line
`LaunchError`. `pin_cpu_kernels` (`train.cpu_kernels`, `train.cpu_threads`) runs first in a
stage's process; `pin_cuda_algorithms` (`train.deterministic`, `train.cudnn_benchmark`) and
`precision_context` (`train.precision`; IEEE float32 on CUDA for fp32) follow.

Every choice that depends on the machine (CUDA or not, native bfloat16 or not) asks
`cuda_available()` and `cpu_has_fast_bf16()` here. The environment variable `GLR_MACHINE`
makes them answer as another machine would: `plain-cpu` (no GPU, no native bfloat16: an AVX2
CPU), `bf16-cpu` (no GPU, AMX / AVX-512 BF16: bfloat16 is then emulated where the CPU lacks
it, correct but slower), `detect` or unset (ask torch). The test suite pins `plain-cpu`; CI
runs it a second time with `bf16-cpu`.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

from glr.errors import LaunchError, ParamsError

log = logging.getLogger(__name__)


MACHINE_VARIABLE = "GLR_MACHINE"


@dataclasses.dataclass(frozen=True)
class Machine:
    """What the code asks of a machine: a CUDA GPU, native bfloat16 on the CPU."""

    cuda: bool
    fast_bf16: bool


MACHINES = {"plain-cpu": Machine(cuda=False, fast_bf16=False),
            "bf16-cpu": Machine(cuda=False, fast_bf16=True)}


def forced_machine() -> Machine | None:
    """The machine `GLR_MACHINE` names, or None to detect this one."""
    value = os.environ.get(MACHINE_VARIABLE, "").strip()
    if value in ("", "detect"):
        return None
    if value not in MACHINES:
        raise ValueError(f"{MACHINE_VARIABLE}={value!r}: expected detect, "
                         f"{', '.join(MACHINES)} (or unset)")
    return MACHINES[value]


def cuda_available() -> bool:
    """Whether a stage may use a CUDA GPU: torch sees one and `GLR_MACHINE` does not hide it."""
    forced = forced_machine()
    return forced.cuda if forced is not None else torch.cuda.is_available()


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a node's local rank among the `visible` GPUs. One visible GPU serves
    whatever rank sees it (a launcher that exposes one GPU per rank: SLURM
    `--gpus-per-task=1`, per-rank CUDA_VISIBLE_DEVICES); several are one per local rank."""
    if visible < 1:
        raise LaunchError("torch sees no CUDA GPU")
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise LaunchError(f"local rank {local_rank} has no GPU of its own: {visible} are visible "
                          f"on this node; start at most {visible} processes per node "
                          "(train.processes, extract.processes, torchrun --nproc_per_node)")
    return local_rank


def check_launcher(environ: dict[str, str]) -> None:
    """Refuse several tasks of one `srun` step that were not started through torchrun: each
    would train alone (WORLD_SIZE 1) on its node's first GPU, writing the same files. Only a
    step's own task count counts: `sbatch -n 8` or `salloc -n 8` around a single command sets
    SLURM_NTASKS, not SLURM_STEP_NUM_TASKS, and is fine."""
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if tasks > 1 and "SLURM_PROCID" in environ and "WORLD_SIZE" not in environ:
        raise LaunchError(f"{tasks} SLURM tasks without torchrun: each would run alone on its "
                          "first GPU. Start one task per node that runs `torchrun "
                          "--nnodes=$SLURM_NNODES --nproc_per_node=<GPUs> ... -m glr <stage>` "
                          "(docs/machines.md)")


def setup_distributed(timeout_minutes: float = 60.0) -> Dist:
    """Join the torchrun process group when there is one (nccl on GPU, gloo on CPU).

    `timeout_minutes` (params train.timeout_minutes): how long a collective waits for a rank
    that is behind before the job aborts (torch's default is 10 minutes for nccl: an
    hours-long extraction whose ranks finish minutes apart would trip it)."""
    check_launcher(dict(os.environ))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = cuda_available()
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity (a SLURM or container cpuset), else the
    machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_processes(environ: dict[str, str] | None = None) -> int:
    """The processes of this job on this node: torchrun's LOCAL_WORLD_SIZE, 1 without it."""
    environ = os.environ if environ is None else environ
    return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def host_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def worker_fit(local: int, cpus: int) -> int:
    """The DataLoader workers per process that a node's CPUs hold: `cpus // local` (0: the
    process decodes its own batches)."""
    return cpus // max(1, local)


def relaunch_under_torchrun(processes: int, argv: list[str]) -> None:
    """Run this very command under torchrun with `processes` per node (replaces the process)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "glr", *argv]
    log.info("starting %d processes: %s", processes, " ".join(command))
    os.execv(sys.executable, command)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX-512 BF16), or `GLR_MACHINE` says
    so. Elsewhere (AVX2, plain AVX-512) oneDNN emulates it, and a bf16 step takes tens of times
    as long as fp32."""
    forced = forced_machine()
    if forced is not None:
        return forced.fast_bf16
    # oneDNN capped below its bfloat16 code (train.cpu_kernels avx2) computes bf16 emulated
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if capped != "ALL" and not any(isa in capped for isa in ("BF16", "AMX", "AVX10")):
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


# `train.cpu_kernels`: the instruction set of torch's CPU kernels, its own (ATen), oneDNN's
# (convolutions) and MKL's (matrix products). `avx2` makes a CPU with AVX-512 or AMX run the
# code an AVX2-only CPU runs, so that its float32 sums round the same way (with the same
# thread count: a kernel splits its sums by thread). Read once per process by each library,
# at its first use: set before any tensor work.
CPU_KERNELS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def pin_cpu_kernels(kernels: str, threads: int) -> None:
    """Pin the CPU kernels' instruction set (`train.cpu_kernels`) and the intra-op threads of
    this process (`train.cpu_threads`, 0: leave torch's choice). The environment goes to every
    process started later (DataLoader workers, torchrun's ranks)."""
    if kernels not in CPU_KERNELS:
        raise ValueError(f"cpu_kernels must be one of {', '.join(CPU_KERNELS)}, got {kernels!r}")
    os.environ.update(CPU_KERNELS[kernels])
    if threads > 0:
        torch.set_num_threads(threads)
    capability = torch.backends.cpu.get_cpu_capability()
    if kernels != "native" and capability not in (kernels.upper(), "DEFAULT"):
        log.warning("train.cpu_kernels %s asked for, but torch already runs %s kernels: this "
                    "process computed before the setting was applied", kernels, capability)


def cpu_kernels_name(kernels: str) -> str:
    """The kernels and threads this process computes with, in words for the logs."""
    return (f"{torch.backends.cpu.get_cpu_capability()} kernels (train.cpu_kernels "
            f"{kernels}), {torch.get_num_threads()} thread(s)")


def pin_cuda_algorithms(deterministic: bool, benchmark: bool) -> str:
    """How CUDA picks its kernels (`train.deterministic`, `train.cudnn_benchmark`); returns it
    in words for the logs. deterministic: torch's deterministic algorithms everywhere (the
    ArcFace gather's backward without atomic adds, cuDNN's deterministic weight gradients,
    cuBLAS with a fixed workspace), so that a GPU rerun gives the same bytes, at some speed;
    an op without such an algorithm then fails, naming itself. benchmark: cuDNN times its
    algorithms per input shape and keeps the fastest (fixed training sizes); not bitwise
    reproducible. On a CPU torch's kernels are deterministic either way."""
    if deterministic and benchmark:
        raise ParamsError("train.deterministic and train.cudnn_benchmark exclude each other: "
                          "cuDNN's benchmark picks algorithms by timing")
    if deterministic:
        # read by cuBLAS when it starts: set before the first CUDA product
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = benchmark
    return ("deterministic algorithms (train.deterministic)" if deterministic
            else "cuDNN benchmark (train.cudnn_benchmark)" if benchmark
            else "torch's default algorithms (fastest known; GPU reruns may differ in the "
                 "last bits: train.deterministic)")


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(device: torch.device, precision: str) -> str:
    """What `precision` (train.precision: auto | fp32 | bf16) computes in on `device`: fp32,
    bf16 or fp16 (fp16 only from auto on CUDA)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def exact_cuda_float32() -> None:
    """float32 on CUDA as IEEE float32: no TF32 in cuDNN's convolutions (on by default) nor in
    cuBLAS. Through torch's `fp32_precision` flags where torch has them (it refuses a mix of
    these and the legacy `allow_tf32` switches in one process), else the legacy ones."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "conv"):
        matmul.fp32_precision = "ieee"
        conv.conv.fp32_precision = "ieee"
    else:  # torch before 2.9
        matmul.allow_tf32 = False
        conv.allow_tf32 = False


def precision_context(device: torch.device, precision: str):
    """(autocast context, GradScaler or None) for the device.

    auto: fp16 + GradScaler on CUDA; bf16 autocast on a CPU with native bfloat16; fp32 on
    other CPUs. fp32: no autocast anywhere, and no TF32 on CUDA. bf16: bf16 autocast on any
    device (no scaler: bfloat16 has float32's exponent range).
    """
    resolved = resolve_precision(device, precision)
    if resolved == "fp32":
        if device.type == "cuda":
            exact_cuda_float32()
        return nullcontext(), None
    if resolved == "fp16":
        return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16), None


def precision_name(device: torch.device, precision: str) -> str:
    """What `precision_context` picks, in words for the logs (the first word: fp32, bf16 or
    fp16)."""
    resolved = resolve_precision(device, precision)
    if precision == "fp32":
        return "fp32 (train.precision)"
    if precision == "bf16":
        emulated = device.type == "cpu" and not cpu_has_fast_bf16()
        return "bf16 autocast (train.precision" + (
            "; this CPU emulates bfloat16: many times slower)" if emulated else ")")
    if resolved == "fp16":
        return "fp16 autocast + GradScaler (train.precision auto on CUDA)"
    if resolved == "bf16":
        return "bf16 autocast (train.precision auto: the CPU has native bfloat16)"
    return ("fp32 (train.precision auto: the CPU has no native bfloat16, which would be "
            "emulated, many times slower)")
