"""Runs the model for the indexer and the searcher: batches of decoded clips -> the three
things an index stores per segment, and queries -> what the searcher needs per query."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pvl_search.checkpoint import load_model, weights_fingerprint
from pvl_search.model import PerceiverVL
from pvl_search.tokenizer import Tokenizer
from pvl_search.video import to_model_input

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "pvl_search" / "weights" / "tiny-synth"


@dataclass
class EncodedClips:
    embeddings: np.ndarray  # (n, d) float32, L2-normalised: goes into FAISS
    rerank_states: np.ndarray  # (n, D + H) float32: the factorised mixed-stream state
    latents: np.ndarray | None  # (n, N * D) float32, only when asked for


@dataclass
class EncodedQueries:
    embeddings: np.ndarray  # (Q, d)
    rerank_states: np.ndarray  # (Q, D + H)
    truncated: list[bool]  # the query was longer than the model's text length


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ModelRunner:
    """A loaded model on a device, with its identity (config + weights fingerprint)."""

    def __init__(
        self,
        model: PerceiverVL,
        fingerprint: str,
        *,
        device: str | None = None,
        cross_layers: int | None = None,
    ) -> None:
        self.device = pick_device(device)
        # bf16 weights on CUDA; float32 on CPU keeps stored vectors exact and reproducible.
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, dtype).eval()
        self.config = model.config
        self.fingerprint = fingerprint
        self.cross_layers = cross_layers
        self.tokenizer = Tokenizer(self.config.text_length)

    @classmethod
    def from_folder(
        cls, folder: str | Path | None = None, *, device: str | None = None, cross_layers: int | None = None
    ) -> "ModelRunner":
        folder = Path(folder) if folder else DEFAULT_MODEL_DIR
        return cls(load_model(folder), weights_fingerprint(folder), device=device, cross_layers=cross_layers)

    @torch.inference_mode()
    def encode_clips(self, frames: np.ndarray, masks: np.ndarray, *, keep_latents: bool = False) -> EncodedClips:
        """frames uint8 (n, F, S, S, 3), masks bool (n, F)."""
        x, m = to_model_input(frames, masks)
        x, m = x.to(self.device, self.model.dtype), m.to(self.device)
        out = self.model.encode_video(x, m, cross_layers=self.cross_layers)
        states = self.model.rerank_state(out.latents)
        latents = out.latents.float().flatten(1).cpu().numpy() if keep_latents else None
        return EncodedClips(out.embedding.cpu().numpy(), states.cpu().numpy(), latents)

    @torch.inference_mode()
    def encode_queries(self, texts: Sequence[str]) -> EncodedQueries:
        ids = self.tokenizer(list(texts)).to(self.device)
        out = self.model.encode_text(ids, cross_layers=self.cross_layers)
        states = self.model.rerank_state(out.latents)
        truncated = [self.tokenizer.is_truncated(t) for t in texts]
        return EncodedQueries(out.embedding.cpu().numpy(), states.cpu().numpy(), truncated)

    @torch.inference_mode()
    def mixed_scores(self, query_states: np.ndarray, candidate_states: np.ndarray) -> np.ndarray:
        """(Q, W) queries x (Q, K, W) candidates -> (Q, K) VTM logits, one batched call."""
        q = torch.as_tensor(query_states, device=self.device)
        c = torch.as_tensor(candidate_states, device=self.device)
        return self.model.mixed_scores(q, c).cpu().numpy()

    @torch.inference_mode()
    def single_scores(self, frames: np.ndarray, masks: np.ndarray, text: str) -> np.ndarray:
        """Joint-encoder VTM logits of one text against n decoded clips: (n,)."""
        x, m = to_model_input(frames, masks)
        x, m = x.to(self.device, self.model.dtype), m.to(self.device)
        ids = self.tokenizer([text]).to(self.device).expand(x.shape[0], -1)
        return self.model.single_stream_scores(x, m, ids, cross_layers=self.cross_layers).cpu().numpy()
