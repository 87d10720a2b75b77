"""Which dtype the model runs in: bfloat16 where the hardware multiplies it natively, else
float32 (`choose_dtype`).

Light on purpose (torch is imported inside the functions): cli.py imports the choice type
at start-up, before it knows whether the command needs the model.

bfloat16 is reached by casting the weights (`model.to(torch.bfloat16)`): autocast was never
faster here and 3.6x slower on one tower (BENCHMARKS.md, "Measured facts"). On a CPU without a native bf16 path
(no AVX512_BF16 / AMX_BF16 / Arm BF16) a bf16 matmul is emulated, about 5x slower than
float32, so `auto` keeps float32 there.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

DtypeChoice = Literal["auto", "float32", "bfloat16"]
DTYPE_CHOICES: tuple[str, ...] = get_args(DtypeChoice)
# /proc/cpuinfo flags of a native bf16 matmul: x86 (AVX512_BF16, AMX) and Arm (FEAT_BF16).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_fields(cpuinfo: str | Path) -> dict[str, str]:
    """Each key of /proc/cpuinfo with its first value (the first CPU's; an Arm kernel's `Model`
    comes after the CPUs' blocks); empty where there is no such file (e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo: str | Path = CPUINFO) -> frozenset[str]:
    """The feature flags the kernel lists for the first CPU (x86 `flags`, Arm `Features`);
    empty where there is no /proc/cpuinfo (e.g. macOS)."""
    return _flags_of(_cpuinfo_fields(cpuinfo))


def _flags_of(fields: dict[str, str]) -> frozenset[str]:
    return frozenset((fields.get("flags") or fields.get("Features") or "").split())


def describe_cpu(cpuinfo: str | Path = CPUINFO) -> str:
    """The CPU's model name, core count and whether it lists a native bf16 flag, for a benchmark
    to print beside its numbers (bf16 ratios mean little without it)."""
    import os
    import platform

    fields = _cpuinfo_fields(cpuinfo)
    name = fields.get("model name") or fields.get("Model") or platform.processor() or platform.machine()
    bf16 = sorted(_flags_of(fields) & BF16_CPU_FLAGS)
    return f"{name}, {os.cpu_count()} cores, bf16 flags: {' '.join(bf16) or 'none (bf16 is emulated)'}"


def _bf16_matmul_is_faster(size: int = 256, repeats: int = 5) -> bool:
    """One tiny timed probe: is a bf16 matmul faster than float32 here? Native is about 4x
    faster, emulated about 5x slower, so the best of a few runs separates them under load."""
    import torch

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b  # first call: kernel selection, allocations
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - started)
        return min(times)

    return best(torch.bfloat16) < best(torch.float32)


@functools.cache
def native_bf16_cpu(cpuinfo: str | Path = CPUINFO) -> bool:
    """Whether this CPU has a native bf16 matmul: a flag in `cpuinfo`, confirmed once per
    process by a timed probe (a VM can list a flag its host does not honour)."""
    return bool(cpu_flags(cpuinfo) & BF16_CPU_FLAGS) and _bf16_matmul_is_faster()


def choose_dtype(
    requested: DtypeChoice | str, device: torch.device, *, probe: Callable[[], bool] = native_bf16_cpu
) -> torch.dtype:
    """The dtype to run the model in on `device`. `auto`: bfloat16 on CUDA, and on a CPU
    when `probe()` says it multiplies bf16 natively; float32 otherwise. `float32` and
    `bfloat16` are taken as asked (bf16 on a CPU without native support is correct, only
    slow). `probe` is a parameter so a test can play a CPU without bf16."""
    import torch

    if requested == "float32":
        return torch.float32
    if requested == "bfloat16":
        return torch.bfloat16
    if requested != "auto":
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, not {requested!r}")
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and probe() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' / 'float32': how an index and an answer name the dtype."""
    return str(dtype).removeprefix("torch.")
