"""Where and how a run computes: the device, the precision (bf16, fp16, fp32) and what the device computes
natively, autocast, clock synchronisation and the processes of torchrun."""
from __future__ import annotations

import os
import sys
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from .files import UsageError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda, mps or cpu; refuse devices that do not exist here."""
    mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("mps" if mps else "cpu")
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
    if device.type == "mps" and not mps:
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: unsupported device (use auto, cpu, cuda, cuda:N or mps)")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def native_bf16(device: torch.device) -> bool:
    """True where `device` computes bf16 natively: CUDA from compute capability 8.0, CPUs with AVX512-BF16 or AMX
    (torch.cuda.is_bf16_supported() also counts older GPUs' slow emulation: a T4 trains faster in fp16)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and cpu_has_fast_bf16()


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 where native, fp16 on older GPUs, else fp32; refuses non-native bf16 on a GPU, fp16 on a CPU."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16 if device.type == "cuda" else torch.float32
    if name == "bf16" and device.type == "cuda" and not native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise UsageError(f"--precision bf16: this GPU ({torch.cuda.get_device_name(device)}, compute capability "
                         f"{major}.{minor}) has no native bf16, which needs 8.0 or newer; use --precision fp16 (or "
                         f"auto, which picks it here)")
    if name == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16: a CPU computes fp16 hundreds of times slower than bf16 or fp32; use "
                         "--precision bf16 on a CPU with native bf16 (AVX512-BF16 or AMX), else fp32 (or auto, which "
                         "picks between them)")
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


def autocast(ctx: TrainContext):
    return torch.autocast(ctx.device.type, dtype=ctx.dtype, enabled=ctx.dtype != torch.float32)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device`, so that a clock reading includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def share_from_rank0(value, ctx: TrainContext):
    """Rank 0's `value` (any picklable one) on every process (a plain run returns it unchanged)."""
    if ctx.world == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, 0)
    return shared[0]


def init_distributed(device: str) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment, the backend NCCL on CUDA, else gloo; (0, 1, 0)
    without torchrun. Refuses a GPU named by number (each process takes its LOCAL_RANK's), more processes than GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.startswith("cuda:"):
        raise UsageError(f"--device {device} under torchrun: each process takes the GPU of its local rank; pass "
                         "--device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES")
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda and local_world > torch.cuda.device_count():
        raise UsageError(f"torchrun started {local_world} processes on a machine with {torch.cuda.device_count()} "
                         f"GPU(s): pass --nproc_per_node={torch.cuda.device_count()} (or --device cpu)")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, local_rank


def resumed_precision(ctx: TrainContext, resume_from: dict, precision_given: bool) -> TrainContext:
    """The context a resumed run trains in: --precision, else its last epoch's precision where native here (a resume
    is bit-identical), else auto's; said when it changes. A history without precisions resolves its --precision."""
    history = resume_from["history"]
    saved = history[-1].get("precision") if history else None
    if saved is None:
        saved = precision_name(resolve_precision(resume_from["settings"].get("precision", "auto"), ctx.device))
    dtype, why = ctx.dtype, "--precision makes the rest"
    if not precision_given:
        dtype = getattr(torch, saved)
        if dtype == torch.bfloat16 and not native_bf16(ctx.device) or dtype == torch.float16 and \
                ctx.device.type == "cpu":
            why = f"{ctx.device} has no native {'bf16' if dtype == torch.bfloat16 else 'fp16'}: --precision auto " \
                  "makes the rest"
            dtype = resolve_precision("auto", ctx.device)
    if precision_name(dtype) != saved and ctx.is_main:
        print(f"note: epochs 1-{len(history)} trained in {saved}; {why} {precision_name(dtype)} (history.json "
              "records each epoch's precision)")
    return ctx._replace(dtype=dtype)


def say(ctx: TrainContext, line: str) -> None:
    """Print a line on the main process, above a progress bar."""
    if ctx.is_main:
        tqdm.write(line, file=sys.stdout)
