"""Which dtype the model runs in: `auto` on a CPU with and without native bf16 (the capability
probe played by the test), explicit choices, and a runner cast to bfloat16 whose outputs stay
float32 and close to float32's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.encoding import ModelRunner
from pvl_search.model.config import preset
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.precision import DTYPE_CHOICES, choose_dtype, cpu_flags, describe_cpu, native_bf16_cpu

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a cuda device object needs no GPU


def no_probe() -> bool:
    raise AssertionError("the capability probe must not run for this choice")


def test_auto_is_float32_on_a_cpu_without_bf16() -> None:
    assert choose_dtype("auto", CPU, probe=lambda: False) == torch.float32


def test_auto_is_bfloat16_on_a_cpu_with_bf16_and_on_cuda() -> None:
    assert choose_dtype("auto", CPU, probe=lambda: True) == torch.bfloat16
    assert choose_dtype("auto", CUDA, probe=no_probe) == torch.bfloat16


def test_explicit_choices_are_taken_as_given() -> None:
    assert choose_dtype("float32", CUDA, probe=no_probe) == torch.float32
    assert choose_dtype("bfloat16", CPU, probe=no_probe) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16"):
        choose_dtype("float16", CPU, probe=no_probe)
    assert DTYPE_CHOICES == ("auto", "float32", "bfloat16")


def test_cpuinfo_flags(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert "avx512_bf16" in cpu_flags(x86) and "bf16" in cpu_flags(arm)
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_benchmarks_name_the_cpu_and_its_bf16_flags(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx512f avx512_bf16\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu avx512f\n")
    assert describe_cpu(x86).startswith("AMD EPYC 9R14, ") and describe_cpu(x86).endswith("bf16 flags: avx512_bf16")
    assert describe_cpu(plain).endswith("bf16 flags: none (bf16 is emulated)")


def test_a_cpu_without_the_flags_never_runs_the_timed_probe(tmp_path: Path) -> None:
    plain = tmp_path / "cpuinfo"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert native_bf16_cpu(plain) is False


def test_a_bfloat16_runner_gives_float32_outputs_close_to_float32() -> None:
    torch.manual_seed(0)
    model = PerceiverVL(preset("tiny").replace(hidden=64, heads=4, latents=8, frame_size=32, patch=8, frames=4,
                                               token_dim=16))
    texts = ["a red square moves left", "blue", "two things swap colours"]
    twin = PerceiverVL(model.config).eval()
    twin.load_state_dict(model.state_dict())  # same weights; the runner casts them (and packs its encoder)
    exact = ModelRunner(model, "f", device="cpu", dtype="float32")
    fast = ModelRunner(twin, "f", device="cpu", dtype="bfloat16")
    assert exact.dtype_name == "float32" and fast.dtype_name == "bfloat16"
    assert next(fast.model.parameters()).dtype == torch.bfloat16
    a, b = exact.encode_queries(texts), fast.encode_queries(texts)
    assert b.embeddings.dtype == np.float32 and b.rerank_states.dtype == np.float32
    cosine = (a.embeddings * b.embeddings).sum(1)  # both L2-normalised
    assert cosine.min() > 0.99
