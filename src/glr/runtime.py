"""Where a stage runs: its torchrun rank and device, and the precision it computes in.

`train` and `extract` share these: under torchrun each process joins the process group (nccl
on GPU, gloo on CPU); with `processes > 1` and no torchrun around, a stage relaunches itself
under torchrun.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the torchrun process group when there is one (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def relaunch_under_torchrun(processes: int, argv: list[str]) -> None:
    """Run this very command under torchrun with `processes` per node (replaces the process)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "glr", *argv]
    log.info("starting %d processes: %s", processes, " ".join(command))
    os.execv(sys.executable, command)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX-512 BF16). Elsewhere (AVX2,
    plain AVX-512) oneDNN emulates it, and a bf16 step takes tens of times as long as fp32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def precision_context(device: torch.device, precision: str):
    """(autocast context, GradScaler or None) for the device.

    auto: fp16 + GradScaler on CUDA; bf16 autocast on a CPU with native bfloat16; fp32 on
    other CPUs. fp32: no autocast anywhere.
    """
    if precision == "fp32":
        return nullcontext(), None
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
    if cpu_has_fast_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16), None
    return nullcontext(), None


def precision_name(device: torch.device, precision: str) -> str:
    """What `precision_context` picks, in words for the logs."""
    if precision == "fp32":
        return "fp32 (train.precision)"
    if device.type == "cuda":
        return "fp16 autocast + GradScaler"
    if cpu_has_fast_bf16():
        return "bf16 autocast (the CPU has native bfloat16)"
    return "fp32 (the CPU has no native bfloat16, which would be emulated, many times slower)"
