"""bfloat16 Linear layers whose weights oneDNN reorders once, for CPU inference.

A plain bfloat16 `nn.Linear` on the CPU hands oneDNN a weight in PyTorch's layout on every call,
and oneDNN reorders it into its blocked layout each time: for the small products of one query
(128 latents × 768) that reorder is a fair part of the call. Reordering once at load time is
what torch.compile's freezing does; here it is done directly. The results are bit for bit those
of the plain layer (tests/test_packed_linear.py); a base text query encodes 7-18 % faster
(BENCHMARKS.md, "Served queries", `benchmarks/bf16_limit.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `pack_linears` applies: bfloat16 on a CPU whose torch has the oneDNN operators."""
    ops = torch.ops.mkldnn
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """An inference-only bfloat16 Linear with its weight in oneDNN's layout, reordered once."""

    def __init__(self, linear: nn.Linear, rows: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, rows), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def pack_linears(module: nn.Module, rows: int) -> int:
    """Replace every bfloat16 `nn.Linear` inside `module` by a `PackedLinear` (`rows`: the rows a
    call usually has, oneDNN's hint for the layout); returns how many were replaced."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16:
            setattr(module, name, PackedLinear(child, rows))
            count += 1
        else:
            count += pack_linears(child, rows)
    return count
