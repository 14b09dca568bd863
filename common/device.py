"""Where and how a run computes: the device, the precision (bf16, fp16, fp32), autocast, clock synchronisation
and the processes of torchrun.

Imports common.errors."""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist

from .errors import UsageError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda, mps or cpu; refuse devices that do not exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: unknown device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: unsupported device (use auto, cpu, cuda, cuda:N or mps)")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on GPUs with native bf16 and on CPUs with fast bf16, fp16 on older GPUs, else fp32.

    Native bf16 starts at compute capability 8.0 (Ampere); torch.cuda.is_bf16_supported() also counts the slow
    emulation of older GPUs such as the T4 and V100, which train faster in fp16 with a gradient scaler.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


class TrainContext(NamedTuple):
    """Where and how training runs: device, precision, process rank and count."""
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def precision_name(dtype: torch.dtype) -> str:
    """'bfloat16', 'float16' or 'float32': how the console, history.json and metrics.json name a precision."""
    return str(dtype).removeprefix("torch.")


def make_scaler(ctx: TrainContext) -> torch.amp.GradScaler:
    """The gradient scaler a training step goes through: active in fp16 only."""
    return torch.amp.GradScaler(ctx.device.type, enabled=ctx.dtype == torch.float16)


def autocast(ctx: TrainContext):
    return torch.autocast(ctx.device.type, dtype=ctx.dtype, enabled=ctx.dtype != torch.float32)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device`, so that a clock reading includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def share_from_rank0(value: int, ctx: TrainContext) -> int:
    """Rank 0's `value` on every process (a plain run returns it unchanged)."""
    if ctx.world == 1:
        return value
    shared = torch.tensor(value, device=ctx.device)
    dist.broadcast(shared, 0)
    return int(shared)


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; a plain run stays single-process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), world, local_rank
