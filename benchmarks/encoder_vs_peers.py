"""Video encoder cost: Perceiver-VL (ours) against two peers, measured in one run.

Same input for all three (one video, F frames of 384x384, random normal "pixels"; random
weights: cost does not depend on them):

  (A) ours   PerceiverVL(preset('base')).encode_video -> multi-stream embedding
  (B) vit    open_clip ViT-B-32 image tower at 384 px (force_image_size=384) applied frame by
             frame (the F frames as a batch of F images), frame embeddings mean-pooled
  (C) joint  joint space-time self-attention encoder of the same width and depth: patch
             embedding + 12 pre-norm transformer layers (hidden 768, 12 heads, MLP 4x) over
             all F*144 patch tokens, mean-pooled and projected (defined below)

Timing: per (frames, dtype) cell, one warm-up call each, then rounds of
ours, peer, ours, peer, ours (peer order rotated every round), so that load from other
processes on a shared machine hits all alike. Reported: median and min ms per encoder, and
the "paired" speed-up = median over peer calls of peer ms / mean of the two calls of ours
beside it (neighbours in time share the load). `--repeats` rounds at least; cheap cells
get more (up to 3x) until --cell-s seconds; a cell where a peer's warm-up took more than
--slow-s seconds gets one round. "CPU share" = process CPU time / (wall x threads): well
below 1 means the threads waited (other load). bfloat16 casts the weights
(model.to(bf16)); its cosine is against the float32 embedding of the same model.

FLOPs (2 per multiply-add), all from torch.utils.flop_counter through
pvl_search.model.profiling.count_flops:
  ours   counted directly (count_flops runs attention as explicit matmuls).
  vit    the counter does not see nn.MultiheadAttention's fused inference path at all (not
         even its q/k/v/out projections), so it counts with that fast path switched off
         (torch.backends.mha.set_fastpath_enabled(False)): the projections then run as
         counted linears, but attention itself runs in scaled_dot_product_attention, which
         the counter does not count on CPU, so QK^T and AV are added analytically:
         layers * 2 matmuls * 2 * n^2 * D per frame, n = 145 tokens (144 patches + class).
         Counted on one frame and multiplied by F (frames are independent).
  joint  counted on the meta device (no memory, no compute, so 64 frames is cheap) with the
         same explicit-attention path as ours; cross-checked against the closed form
         12 * (24 M D^2 + 4 M^2 D) + patch embedding.

Run:  python benchmarks/encoder_vs_peers.py --frames 8,16,32,64 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pvl_search.model.config import preset  # noqa: E402
from pvl_search.model.layers import SelfAttentionBlock  # noqa: E402
from pvl_search.model.perceiver import PerceiverVL, count_parameters  # noqa: E402
from pvl_search.model.profiling import count_flops  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NAMES = {"ours": "(A) ours: Perceiver-VL base", "vit": "(B) ViT-B/32 per frame", "joint": "(C) joint space-time"}


# --------------------------------------------------------------------------- peers
class JointSpaceTimeEncoder(nn.Module):
    """Patch embedding + `depth` standard pre-norm transformer layers over all F * g * g
    patch tokens at once (attention cost quadratic in F), mean-pooled and projected.

    Uses the same layer class as ours' latent self-attention (pvl_search.model.layers), so the
    comparison is about the architecture, not kernels.
    """

    def __init__(
        self,
        *,
        hidden: int = 768,
        heads: int = 12,
        depth: int = 12,
        mlp_ratio: float = 4.0,
        frame_size: int = 384,
        patch: int = 32,
        max_frames: int = 64,
        embed_dim: int = 256,
    ) -> None:
        super().__init__()
        self.hidden = hidden
        grid = frame_size // patch
        self.patch_embed = nn.Conv2d(3, hidden, kernel_size=patch, stride=patch)
        self.position = nn.Parameter(torch.randn(grid * grid, hidden) * 0.02)
        self.temporal = nn.Parameter(torch.randn(max_frames, hidden) * 0.02)
        self.layers = nn.ModuleList(SelfAttentionBlock(hidden, heads=heads, mlp_ratio=mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, embed_dim, bias=False)

    def forward(self, frames: Tensor) -> Tensor:
        b, f = frames.shape[:2]
        x = self.patch_embed(frames.flatten(0, 1)).flatten(2).transpose(1, 2)  # (B*F, g*g, D)
        x = x.reshape(b, f, -1, self.hidden) + self.position + self.temporal[:f, None]
        x = x.reshape(b, -1, self.hidden)  # (B, F*g*g, D): one sequence over space and time
        for layer in self.layers:
            x = layer(x)
        return F.normalize(self.proj(self.norm(x).mean(1)).float(), dim=-1)


class FrameWiseViT(nn.Module):
    """open_clip ViT-B-32 image tower on each frame, frame embeddings mean-pooled."""

    def __init__(self, frame_size: int = 384) -> None:
        super().__init__()
        import open_clip

        clip = open_clip.create_model("ViT-B-32", pretrained=None, force_image_size=frame_size)
        self.visual = clip.visual
        self.tokens = self.visual.grid_size[0] * self.visual.grid_size[1] + 1  # + class token
        self.width = self.visual.transformer.width
        self.depth = len(self.visual.transformer.resblocks)

    def forward(self, frames: Tensor) -> Tensor:
        b, f = frames.shape[:2]
        e = self.visual(frames.flatten(0, 1)).view(b, f, -1).mean(1)
        return F.normalize(e.float(), dim=-1)


@contextlib.contextmanager
def mha_fastpath(enabled: bool) -> Iterator[None]:
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


# --------------------------------------------------------------------------- FLOPs
def flops_ours(model: PerceiverVL, frames: Tensor) -> float:
    return count_flops(lambda: model.encode_video(frames)) / 1e9


def flops_vit(vit: FrameWiseViT, frames: int, size: int) -> tuple[float, dict]:
    one = torch.randn(1, 1, 3, size, size)
    with mha_fastpath(False):
        counted = count_flops(lambda: vit(one))
    n, d = vit.tokens, vit.width
    attention = vit.depth * 2 * 2 * n * n * d  # QK^T and AV, 2 FLOPs per multiply-add
    per_frame = counted + attention
    return per_frame * frames / 1e9, {
        "counted_per_frame_gflops": counted / 1e9,
        "attention_added_per_frame_gflops": attention / 1e9,
    }


def flops_joint(frames: int, size: int, patch: int, max_frames: int) -> tuple[float, dict]:
    with torch.device("meta"):
        meta = JointSpaceTimeEncoder(frame_size=size, patch=patch, max_frames=max_frames)
        x = torch.empty(1, frames, 3, size, size)
    counted = count_flops(lambda: meta(x))
    d, m = 768, frames * (size // patch) ** 2
    closed = 12 * (24 * m * d * d + 4 * m * m * d) + 2 * m * 3 * patch * patch * d + 2 * d * 256
    return counted / 1e9, {"closed_form_gflops": closed / 1e9, "tokens": m}


# --------------------------------------------------------------------------- timing
def time_call(fn: Callable[[], Tensor]) -> tuple[float, Tensor]:
    start = time.perf_counter()
    out = fn()
    return (time.perf_counter() - start) * 1000, out


def cosine(a: Tensor, b: Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1)).min().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", default="8,16,32", help="comma-separated frame counts (default 8,16,32)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per cell after one warm-up")
    p.add_argument("--dtypes", default="float32,bfloat16", help="float32,bfloat16")
    p.add_argument("--json", type=Path, default=None, help="write all measurements here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--slow-s", type=float, default=10.0, help="a cell where a peer's warm-up took longer gets 1 round")
    p.add_argument("--cell-s", type=float, default=8.0, help="cheap cells get extra rounds until this many seconds")
    p.add_argument(
        "--joint-limit-s", type=float, default=30.0, help="skip timing (C) where its predicted call time exceeds this"
    )
    args = p.parse_args(argv)
    frame_counts = [int(f) for f in args.frames.split(",")]
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    if unknown := [d for d in dtypes if d not in DTYPES]:
        p.error(f"unknown dtype(s) {unknown}; choose from {list(DTYPES)}")
    torch.set_num_threads(args.threads)
    run_start = time.perf_counter()

    config = preset("base")
    size = config.frame_size
    if max(frame_counts) > config.max_frames:
        p.error(f"--frames above {config.max_frames} interpolate ours' temporal table; keep to <= {config.max_frames}")
    torch.manual_seed(0)
    base = {
        "ours": PerceiverVL(config).eval().requires_grad_(False),
        "vit": FrameWiseViT(size).eval().requires_grad_(False),
        "joint": JointSpaceTimeEncoder(frame_size=size, patch=config.patch, max_frames=max(frame_counts))
        .eval()
        .requires_grad_(False),
    }
    params = {
        "ours": count_parameters(base["ours"].video_embed)
        + count_parameters(base["ours"].encoder)
        + count_parameters(base["ours"].video_proj)
        + base["ours"].modality.numel(),
        "vit": count_parameters(base["vit"]),
        "joint": count_parameters(base["joint"]),
    }
    inputs = {f: torch.randn(1, f, 3, size, size, generator=torch.Generator().manual_seed(f)) for f in frame_counts}

    # FLOPs do not depend on dtype: one count per (encoder, frames).
    flops: dict[tuple[str, int], float] = {}
    flop_notes: dict[tuple[str, int], dict] = {}
    for f in frame_counts:
        flops["ours", f] = flops_ours(base["ours"], inputs[f])
        flops["vit", f], flop_notes["vit", f] = flops_vit(base["vit"], f, size)
        flops["joint", f], flop_notes["joint", f] = flops_joint(f, size, config.patch, max(frame_counts))
    print(f"# FLOPs counted in {time.perf_counter() - run_start:.1f} s", file=sys.stderr)

    rows: list[dict] = []
    reference: dict[tuple[str, int], Tensor] = {}  # float32 embeddings, for the bf16 cosine
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        models = base if dtype == torch.float32 else {k: copy.deepcopy(m).to(dtype) for k, m in base.items()}
        fns = {
            "ours": lambda x: models["ours"].encode_video(x).embedding,
            "vit": lambda x: models["vit"](x),
            "joint": lambda x: models["joint"](x),
        }
        rate: dict[str, float] = {}  # GFLOP/s of (C) at the largest size timed so far
        for f in frame_counts:
            x = inputs[f].to(dtype)
            active = ["ours", "vit", "joint"]
            skipped: dict[str, str] = {}
            if "joint" in rate:
                predicted = flops["joint", f] / rate["joint"]
                if predicted > args.joint_limit_s:
                    active.remove("joint")
                    skipped["joint"] = f"not timed: predicted {predicted:.0f} s per call from its GFLOP/s at fewer frames"
            times: dict[str, list[float]] = {k: [] for k in active}
            cpu: dict[str, list[float]] = {k: [] for k in active}  # process CPU ms per call
            paired: dict[str, list[float]] = {k: [] for k in active if k != "ours"}
            outputs: dict[str, Tensor] = {}
            warm: dict[str, float] = {}
            load_before = os.getloadavg()[0]
            cell_start = time.perf_counter()

            def timed(k: str) -> float:
                c0 = time.process_time()
                ms = time_call(lambda: fns[k](x))[0]
                times[k].append(ms)
                cpu[k].append((time.process_time() - c0) * 1000)
                return ms

            with torch.inference_mode():
                for k in active:  # warm-up; its output is the embedding we compare
                    warm[k], outputs[k] = time_call(lambda: fns[k](x))
                    print(f"# {dtype_name} {f:>3} frames {k:<5} warm-up {warm[k]:9.1f} ms", file=sys.stderr)
                peers = [k for k in active if k != "ours"]
                slow = any(warm[k] > args.slow_s * 1000 for k in peers)
                r = 0
                # Each round: ours, peer, ours, peer, ours (peer order rotated), so every peer
                # call is flanked by two calls of ours and the ratio is taken between
                # neighbours in time. Cheap cells get extra rounds (up to 3x --repeats)
                # until --cell-s seconds have been spent on them.
                while True:
                    order = peers[r % len(peers) :] + peers[: r % len(peers)]
                    before = timed("ours")
                    for k in order:
                        ms = timed(k)
                        after = timed("ours")
                        paired[k].append(ms / ((before + after) / 2))
                        before = after
                    r += 1
                    if slow or (r >= args.repeats and (r >= 3 * args.repeats or time.perf_counter() - cell_start > args.cell_s)):
                        break
            load_after = os.getloadavg()[0]
            if dtype == torch.float32:
                for k in active:
                    reference[k, f] = outputs[k]
            elif ("ours", f) not in reference:  # float32 not timed: still check ours' cosine
                with torch.inference_mode():
                    reference["ours", f] = base["ours"].encode_video(inputs[f]).embedding
            for k in ["ours", "vit", "joint"]:
                ms = statistics.median(times[k]) if k in times else None
                if ms is not None and k == "joint":
                    rate["joint"] = flops[k, f] / (min(times[k]) / 1000)
                cos = None
                if dtype != torch.float32 and k in outputs and (k, f) in reference:
                    cos = cosine(outputs[k], reference[k, f])
                rows.append(
                    {
                        "encoder": k,
                        "frames": f,
                        "tokens": f * config.grid**2,
                        "dtype": dtype_name,
                        "ms": ms,
                        "ms_min": min(times[k]) if k in times else None,
                        "ms_all": times.get(k, []),
                        "cpu_ms_all": cpu.get(k, []),
                        # process CPU time / (wall time x threads): 1.0 = both threads busy the
                        # whole call; well below 1 = the threads were waiting (other load).
                        "cpu_share": None if k not in times else statistics.median(
                            c / (t * args.threads) for c, t in zip(cpu[k], times[k])
                        ),
                        "warmup_ms": warm.get(k),
                        "gflops": flops[k, f],
                        "gflop_per_s": None if ms is None else flops[k, f] / (ms / 1000),
                        "speedup_paired": statistics.median(paired[k]) if paired.get(k) else None,
                        "speedup_paired_all": paired.get(k, []),
                        "loadavg_1min": [load_before, load_after],
                        "cos_vs_fp32": cos,
                        "note": skipped.get(k, ""),
                        **flop_notes.get((k, f), {}),
                    }
                )
        if dtype != torch.float32:
            del models

    # ------------------------------------------------------------------ report
    by = {(r["encoder"], r["frames"], r["dtype"]): r for r in rows}

    def fmt(v: float | None, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    lines = [
        "| config | frames | dtype | ms median | ms min | calls | GFLOPs | GFLOP/s | CPU share "
        "| ours faster (paired median) | ours faster (min/min) | ours fewer FLOPs | bf16 cos vs fp32 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in frame_counts:
        for dtype_name in dtypes:
            ours = by["ours", f, dtype_name]
            for k in ["ours", "vit", "joint"]:
                r = by[k, f, dtype_name]
                peer = k != "ours"
                by_min = None if r["ms_min"] is None else r["ms_min"] / ours["ms_min"]
                lines.append(
                    f"| {NAMES[k]} | {f} | {dtype_name} | {fmt(r['ms'], '.0f')} | {fmt(r['ms_min'], '.0f')} "
                    f"| {len(r['ms_all']) or '—'} | {r['gflops']:.1f} | {fmt(r['gflop_per_s'], '.0f')} "
                    f"| {fmt(r['cpu_share'], '.2f')} "
                    f"| {fmt(r['speedup_paired'], '.2f') + 'x' if peer and r['speedup_paired'] else '—' if peer else ''} "
                    f"| {fmt(by_min, '.2f') + 'x' if peer and by_min else '—' if peer else ''} "
                    f"| {format(r['gflops'] / ours['gflops'], '.2f') + 'x' if peer else ''} "
                    f"| {fmt(r['cos_vs_fp32'], '.6f')} |"
                )
    print("\n".join(lines))

    # Goals (from the issue): >= 3x vs frame-wise ViT, >= 5x vs joint at 8 frames, gap widening.
    # Judged on the paired median speed-up (each peer call against the calls of ours beside it).
    print()
    goals = []
    for dtype_name in dtypes:
        for k, target in [("vit", 3.0), ("joint", 5.0)]:
            ratios = [(f, by[k, f, dtype_name]["speedup_paired"]) for f in frame_counts]
            ratios = [(f, v) for f, v in ratios if v is not None]
            flop_ratios = [(f, by[k, f, dtype_name]["gflops"] / by["ours", f, dtype_name]["gflops"]) for f in frame_counts]
            first = next((v for f, v in ratios if f == 8), None)
            widening = all(b > a for (_, a), (_, b) in zip(ratios, ratios[1:]))
            goals.append(
                {
                    "dtype": dtype_name,
                    "peer": k,
                    "target_at_8": target,
                    "speedup_at_8": first,
                    "met_at_8": None if first is None else first >= target,
                    "speedups": ratios,
                    "flop_ratios": flop_ratios,
                    "widening": widening,
                }
            )
            trend = ", ".join(f"{f}f {v:.2f}x" for f, v in ratios)
            verdict = "n/a (8 frames not run)" if first is None else ("MET" if first >= target else "MISSED")
            print(
                f"- {dtype_name} vs {NAMES[k]}: goal >= {target:.0f}x at 8 frames: {verdict}; "
                f"paired speed-up by frames: {trend}; {'widening' if widening else 'NOT monotonically widening'}; "
                f"FLOP ratio: " + ", ".join(f"{f}f {v:.2f}x" for f, v in flop_ratios)
            )
    for dtype_name in dtypes:
        if dtype_name == "float32":
            continue
        coss = [(f, by["ours", f, dtype_name]["cos_vs_fp32"]) for f in frame_counts]
        print(f"- ours {dtype_name} embedding cosine vs float32 (goal >= 0.999): " + ", ".join(f"{f}f {c:.6f}" for f, c in coss))
    for r in rows:
        if r["note"]:
            print(f"- {NAMES[r['encoder']]} {r['frames']} frames {r['dtype']}: {r['note']}")
    for f in frame_counts:
        n = flop_notes["joint", f]
        print(
            f"- FLOP cross-check {f} frames: joint counted {flops['joint', f]:.1f} vs closed form "
            f"{n['closed_form_gflops']:.1f} GFLOPs; ViT per frame counted {flop_notes['vit', f]['counted_per_frame_gflops']:.2f} "
            f"+ attention added {flop_notes['vit', f]['attention_added_per_frame_gflops']:.3f} GFLOPs"
        )
    total_s = time.perf_counter() - run_start
    print(f"- parameters: ours video path {params['ours'] / 1e6:.1f} M, ViT-B/32 tower {params['vit'] / 1e6:.1f} M, "
          f"joint {params['joint'] / 1e6:.1f} M; run took {total_s:.0f} s")

    if args.json:
        meta = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "params": params,
            "seconds": total_s,
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "goals": goals}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
