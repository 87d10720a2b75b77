"""Parameters, FLOPs and CPU latency of each way the model is used.

FLOPs come from torch.utils.flop_counter (2 FLOPs per multiply-add) with attention run
as explicit matmuls, because the counter does not see the fused CPU attention kernel.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pvl_search.model.config import ModelConfig
from pvl_search.model.joint_reranker import JointReranker, JointRerankerConfig
from pvl_search.model.layers import explicit_attention
from pvl_search.model.perceiver import PerceiverVL, count_parameters


@dataclass
class ProfileRow:
    name: str
    params: int  # parameters that take part in this computation
    gflops: float  # per item: one video, one text, one pair or one candidate
    latency_ms: float  # median wall time per item on this machine
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of fn, attention included."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), explicit_attention(), counter:
        fn()
    return counter.get_total_flops()


def median_ms(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _params(*modules: nn.Module | nn.Parameter) -> int:
    return sum(m.numel() if isinstance(m, nn.Parameter) else count_parameters(m) for m in modules)


# (name, parameters taking part, the call, items per call, note)
Run = tuple[str, int, Callable[[], object], int, str]


def profile_model(
    config: ModelConfig,
    *,
    cross_layers: int | None = None,
    candidates: int = 50,
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    seed: int = 0,
) -> list[ProfileRow]:
    """Profile a randomly initialised model of `config` (FLOPs do not depend on the weights)."""
    torch.manual_seed(seed)
    # With the latent reranker always built, so its row is there whichever model ships.
    model = PerceiverVL(config.replace(latent_reranker=True)).eval().to(dtype).requires_grad_(False)
    s = config.frame_size
    frames = torch.randn(1, config.frames, 3, s, s)
    token_ids = torch.randint(1, 1000, (1, config.text_length))
    runs = _encoder_runs(model, config, frames, token_ids, cross_layers)
    runs += _decoder_runs(model, config, frames, token_ids, cross_layers, candidates)
    rows = []
    for name, params, fn, per, note in runs:
        flops = count_flops(fn)
        rows.append(ProfileRow(name, params, flops / per / 1e9, median_ms(fn, repeats=repeats) / per, note))
    return rows


def _encoder_runs(
    model: PerceiverVL, config: ModelConfig, frames: torch.Tensor, token_ids: torch.Tensor, cross_layers: int | None
) -> list[Run]:
    """The two encoders, and the single-stream pair that runs the joint encoder and decoder."""
    encoder_params = _params(model.encoder, model.modality)
    decoder_params = _params(model.decoder, model.vtm_query, model.vtm_head)
    tokens = config.frames * config.grid**2
    return [
        (
            "video encoder",
            encoder_params + _params(model.video_embed, model.video_proj),
            lambda: model.encode_video(frames, cross_layers=cross_layers),
            1,
            f"{config.frames} frames, {tokens} patch tokens -> {config.latents} latents",
        ),
        (
            "text encoder",
            encoder_params + _params(model.text_embed, model.text_proj),
            lambda: model.encode_text(token_ids, cross_layers=cross_layers),
            1,
            f"{config.text_length} tokens",
        ),
        (
            "single-stream pair",
            encoder_params + _params(model.video_embed, model.text_embed) + decoder_params,
            lambda: model.single_stream_scores(frames, None, token_ids, cross_layers=cross_layers),
            1,
            "joint encoder + VTM decoder",
        ),
    ]


def _decoder_runs(
    model: PerceiverVL, config: ModelConfig, frames: torch.Tensor, token_ids: torch.Tensor,
    cross_layers: int | None, candidates: int,
) -> list[Run]:
    """What reranking costs: rerank states at index time, then each reranker per candidate."""
    with torch.inference_mode():
        video = model.encode_video(frames, cross_layers=cross_layers).latents
        text = model.encode_text(token_ids, cross_layers=cross_layers).latents
        video_many = video.expand(candidates, -1, -1).contiguous()
        video_states = model.rerank_state(video_many)
        text_state = model.rerank_state(text)[0]
    decoder_params = _params(model.decoder, model.vtm_query, model.vtm_head)
    return [
        (
            "rerank state (index time)",
            decoder_params,
            lambda: model.rerank_state(video),
            1,
            f"{config.rerank_state_width} floats per video",
        ),
        (
            "mixed decoder, plain",
            decoder_params,
            lambda: model.mixed_scores_plain(video_many, text),
            candidates,
            f"per candidate, {candidates} at once, over {2 * config.latents} latents",
        ),
        (
            "mixed decoder, factorised",
            decoder_params,
            lambda: model.mixed_scores(text_state, video_states),
            candidates,
            f"per candidate, {candidates} at once, from rerank states",
        ),
        (
            "latent reranker",
            _params(model.latent_reranker),
            lambda: model.latent_scores(text, video_many),
            candidates,
            f"per candidate, {candidates} at once, from stored latents ({config.latents * config.hidden} floats each)",
        ),
        _joint_run(config, text, video_many, candidates),
    ]


def _joint_run(config: ModelConfig, text: torch.Tensor, video_many: torch.Tensor, candidates: int) -> Run:
    """The joint reranker at its default size, over the same stored latents."""
    joint = JointReranker(JointRerankerConfig(config.hidden, config.latents, config.latents, heads=config.heads))
    joint = joint.eval().to(text.dtype).requires_grad_(False)
    return (
        "joint reranker",
        _params(joint),
        lambda: joint(text, video_many[None]),
        candidates,
        f"per candidate, {candidates} at once: {1 + config.latents} tokens x {joint.config.layers} blocks over "
        "the query's latents",
    )
