"""Runs the model for the indexer and the searcher: batches of decoded clips -> the three
things an index stores per segment, and queries -> what the searcher needs per query."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pvl_search.media.video import to_model_input
from pvl_search.model.checkpoint import load_clip_seconds, load_model, load_search_defaults, weights_fingerprint
from pvl_search.model.defaults import DEFAULT_MODEL_DIR, pick_device
from pvl_search.model.joint_reranker import JointReranker, load_reranker
from pvl_search.model.packed_linear import can_pack, pack_linears
from pvl_search.model.patch_reranker import PatchReranker, load_patch_reranker, real_patches, stored_patch_tokens
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.model.tokenizer import Tokenizer
from pvl_search.precision import DtypeChoice, choose_dtype, dtype_name

log = logging.getLogger("pvl_search.encoding")


@dataclass
class EncodedClips:
    embeddings: np.ndarray  # (n, d) float32, L2-normalised: goes into FAISS
    rerank_states: np.ndarray  # (n, D + H) float32: the factorised mixed-stream state
    latents: np.ndarray | None  # (n, N * D) float32, only when asked for
    patches: np.ndarray | None = None  # (n, M * D) float32 patch tokens, only when asked for


@dataclass
class EncodedQueries:
    embeddings: np.ndarray  # (Q, d)
    rerank_states: np.ndarray  # (Q, D + H)
    truncated: list[bool]  # the query was longer than the model's text length
    latents: np.ndarray | None = None  # (Q, N, D) float32, for the latent reranker


class ModelRunner:
    """A loaded model on a device, with its identity (config + weights fingerprint)."""

    def __init__(
        self,
        model: PerceiverVL,
        fingerprint: str,
        *,
        device: str | None = None,
        cross_layers: int | None = None,
        dtype: DtypeChoice = "auto",
        search_defaults: dict | None = None,
        reranker: JointReranker | None = None,
        clip_s: float | None = None,
        patch_reranker: PatchReranker | None = None,
        pack_weights: bool = True,
    ) -> None:
        self.device = pick_device(device)
        self.clip_s = clip_s  # the clip length it was trained on (clip.json): index windows follow it
        self.search_defaults = search_defaults or {}  # e.g. {"rerank": "latent"}: what validation chose
        # Cast weights, not autocast (BENCHMARKS.md, "Measured facts"): bf16 on CUDA and on CPUs with native bf16.
        # What leaves the runner is float32 either way, so indexes stay comparable.
        self.dtype = choose_dtype(dtype, self.device)
        self.model = model.to(self.device, self.dtype).eval()
        if pack_weights and can_pack(self.device, self.dtype):  # encoder weights reordered once, same results
            self.model = copy.deepcopy(self.model)  # on a copy: the caller's model stays a plain module
            with torch.inference_mode():
                pack_linears(self.model.encoder, model.config.latents)
                pack_linears(self.model.text_embed.mixer, model.config.text_length)
        self.config = model.config
        self.fingerprint = fingerprint
        self.retrieval_scale = model.retrieval_scale  # fuses rerank logits with similarities
        # The joint reranker shipped beside the model (its own weights; it changes no vector).
        self.reranker = None if reranker is None else reranker.to(self.device, self.dtype).eval()
        # The patch reranker beside it reads the patch tokens an index stores per segment.
        self.patch_reranker = None if patch_reranker is None else patch_reranker.to(self.device, self.dtype).eval()
        self.cross_layers = cross_layers
        self.tokenizer = Tokenizer(self.config.text_length)
        # (batch size, torch threads) -> whether a batched text-encoder call is exact there
        self.batch_exact: dict[tuple[int, int], bool] = {}

    @classmethod
    def from_folder(
        cls,
        folder: str | Path | None = None,
        *,
        device: str | None = None,
        cross_layers: int | None = None,
        dtype: DtypeChoice = "auto",
    ) -> ModelRunner:
        folder = Path(folder) if folder else DEFAULT_MODEL_DIR
        return cls(load_model(folder), weights_fingerprint(folder), device=device, cross_layers=cross_layers,
                   dtype=dtype, search_defaults=load_search_defaults(folder), reranker=load_reranker(folder),
                   clip_s=load_clip_seconds(folder), patch_reranker=load_patch_reranker(folder))

    @property
    def dtype_name(self) -> str:
        """The dtype the model runs in, as an index and an answer name it."""
        return dtype_name(self.dtype)

    @torch.inference_mode()
    def encode_clips(self, frames: np.ndarray, masks: np.ndarray, *, keep_latents: bool = False,
                     keep_patches: bool = False) -> EncodedClips:
        """frames uint8 (n, F, S, S, 3), masks bool (n, F)."""
        x, m = to_model_input(frames, masks, self.model.dtype)  # normalised straight into the model's dtype
        x, m = x.to(self.device), m.to(self.device)
        out = self.model.encode_video(x, m, cross_layers=self.cross_layers, keep_inputs=keep_patches)
        states = self.model.rerank_state(out.latents)
        latents = out.latents.float().flatten(1).cpu().numpy() if keep_latents else None
        patches = stored_patch_tokens(out.inputs, m).flatten(1).cpu().numpy() if keep_patches else None
        return EncodedClips(out.embedding.cpu().numpy(), states.cpu().numpy(), latents, patches)

    @torch.inference_mode()
    def encode_queries(self, texts: Sequence[str]) -> EncodedQueries:
        """One text-encoder call for all `texts` (where that is exact, see `_text_latents`);
        each row comes out bit for bit as that text encoded alone, so a query's answer does
        not depend on what it was batched with."""
        ids, truncated = self.tokenizer.encode(list(texts))
        latents = self._text_latents(ids.to(self.device))
        # The small (B, D) products after the encoder depend on B (a 1-row product takes
        # another kernel than a B-row one): run them a row at a time, as a batch of one
        # would. They are a tiny part of the cost.
        embeddings, states = [], []
        for row in latents.split(1):
            embeddings.append(PerceiverVL._embed(row, self.model.text_proj))
            states.append(self.model.rerank_state(row))
        keeps = any(r is not None for r in (self.model.latent_reranker, self.reranker, self.patch_reranker))
        keep = latents.float().cpu().numpy() if keeps else None
        return EncodedQueries(torch.cat(embeddings).cpu().numpy(), torch.cat(states).cpu().numpy(), truncated, keep)

    def _text_latents(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, N, D) text latents, row i bit for bit what text i gives alone.

        Whether a B-row encoder call rounds every row as a 1-row call does is up to the
        matmul kernels the BLAS picks for each shape (on this project's CPUs it holds for
        the shipped and the base model, and not for toy sizes of 8 latents). So the first
        call with B rows (and this thread count) also encodes the rows one by one and
        compares; B-row calls are then used where they matched, and rows are encoded one by
        one where they did not. Shapes, not texts, decide, so one check per B suffices."""
        def encode(x: torch.Tensor) -> torch.Tensor:
            return self.model.encode_text(x, cross_layers=self.cross_layers).latents

        b = ids.shape[0]
        key = (b, torch.get_num_threads())
        exact = self.batch_exact.get(key)
        if b == 1 or exact:
            return encode(ids)
        alone = torch.cat([encode(ids[i : i + 1]) for i in range(b)])
        if exact is None:
            self.batch_exact[key] = exact = torch.equal(encode(ids), alone)
            if not exact:
                log.info("a batch of %d queries does not encode bit for bit as %d single ones here "
                         "(%s, %d threads): such batches are encoded one query at a time", b, b,
                         self.dtype_name, key[1])
        return alone

    @torch.inference_mode()
    def mixed_scores(self, query_states: np.ndarray, candidate_states: np.ndarray) -> np.ndarray:
        """(Q, W) queries x (Q, K, W) candidates -> (Q, K) VTM logits, one batched call."""
        q = torch.as_tensor(query_states, device=self.device)
        c = torch.as_tensor(candidate_states, device=self.device)
        return self.model.mixed_scores(q, c).cpu().numpy()

    @torch.inference_mode()
    def latent_scores(self, query_latents: np.ndarray, candidate_latents: np.ndarray) -> np.ndarray:
        """One query's text latents (N, D) x K candidates' stored video latents (K, N, D) or
        (K, N * D) -> (K,) latent-reranker logits, one batched call."""
        q, c = self._latent_pair(query_latents, candidate_latents)
        return self.model.latent_scores(q[None], c)[0].float().cpu().numpy()

    def _latent_pair(self, query_latents: np.ndarray, candidate_latents: np.ndarray
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """A query's latents (N, D) and K candidates' stored latents as (K, N, D), on the
        device in the model's dtype (both latent-reading rerankers take them so)."""
        config = self.config
        q = torch.as_tensor(query_latents, device=self.device).to(self.dtype)
        c = torch.as_tensor(candidate_latents, device=self.device).reshape(-1, config.latents, config.hidden)
        return q, c.to(self.dtype)

    @torch.inference_mode()
    def joint_scores(self, query_latents: np.ndarray, candidate_latents: np.ndarray) -> np.ndarray:
        """One query's text latents (N, D) x K candidates' stored video latents (K, N, D) or
        (K, N * D) -> (K,) joint-reranker logits, one batched call."""
        if self.reranker is None:
            raise ValueError("this model has no joint reranker (no reranker/ in its folder)")
        q, c = self._latent_pair(query_latents, candidate_latents)
        return self.reranker.score(q, c).float().cpu().numpy()

    @torch.inference_mode()
    def patch_scores(self, query_latents: np.ndarray, candidate_patches: np.ndarray) -> np.ndarray:
        """One query's text latents (N, D) x K candidates' stored patch tokens (K, M, D) or
        (K, M * D) -> (K,) patch-reranker logits, one batched call."""
        if self.patch_reranker is None:
            raise ValueError("this model has no patch reranker (no patch-reranker/ in its folder)")
        q = torch.as_tensor(query_latents, device=self.device).to(self.dtype)
        c = torch.as_tensor(candidate_patches, device=self.device)
        c = c.reshape(len(candidate_patches), -1, self.config.hidden)
        return self.patch_reranker.score(q, c.to(self.dtype), real_patches(c)).cpu().numpy()

    @torch.inference_mode()
    def single_scores(self, frames: np.ndarray, masks: np.ndarray, text: str) -> np.ndarray:
        """Joint-encoder VTM logits of one text against n decoded clips: (n,)."""
        x, m = to_model_input(frames, masks, self.model.dtype)  # normalised straight into the model's dtype
        x, m = x.to(self.device), m.to(self.device)
        ids = self.tokenizer([text]).to(self.device).expand(x.shape[0], -1)
        return self.model.single_stream_scores(x, m, ids, cross_layers=self.cross_layers).cpu().numpy()
