"""Which reranker a request gets and how it scores candidates from what the index stored: the
one rule that the searcher, the server's gates and `eval` share.

- ``auto`` resolves to the reranker the model's validation chose (its folder's
  search_defaults.json) when this index can run it, else ``latent`` where it can run, else
  ``mixed``;
- ``stacked`` adds the latent and the patch reranker's logits (the patch one weighted by the
  model's search_defaults.json ``patch_weight``): the two read different stores and make
  different mistakes, so their sum beat either alone on validation (the model card);
- ``patch`` lets the query's text latents read each candidate's stored patch tokens (the
  cross-encoder shipped beside the model, pvl_search.model.patch_reranker);
- ``joint`` reads the query's text latents and each candidate's stored video latents together
  (the cross-encoder shipped beside the model, pvl_search.model.joint_reranker);
- ``mixed`` scores from the stored rerank states (the paper's [CLS] decoder, factorised);
- ``latent`` from the stored video latents (the query's latents attend over them);
- ``single`` decodes every candidate again and runs the joint encoder (slow: its depth is
  limited, and the server runs such requests one at a time).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from indexer.encoding import ModelRunner
from indexer.search.request import DEFAULT_FUSION, DEFAULT_RERANK_K, SearchError, SearchRequest, check_rerank_depth
from indexer.store.base import StoreBase


def latent_rerank_available(runner: ModelRunner, store: StoreBase) -> bool:
    """Whether the latent reranker can run: the model has one and the index keeps latents."""
    return runner.model.latent_reranker is not None and store.layout.keeps_latents


def joint_rerank_available(runner: ModelRunner, store: StoreBase) -> bool:
    """Whether the joint reranker can run: the model folder has one and the index keeps latents."""
    return runner.reranker is not None and store.layout.keeps_latents


def patch_rerank_available(runner: ModelRunner, store: StoreBase) -> bool:
    """Whether the patch reranker can run: the model folder has one and the index keeps patch tokens."""
    layout = store.layout
    return runner.patch_reranker is not None and layout is not None and layout.keeps_patches


def stacked_rerank_available(runner: ModelRunner, store: StoreBase) -> bool:
    """Whether the stacked reranker can run: both the latent and the patch reranker can."""
    return latent_rerank_available(runner, store) and patch_rerank_available(runner, store)


def rerank_mode(requested: str, runner: ModelRunner, store: StoreBase) -> str:
    """The reranker a request gets (see the module doc); SearchError when `latent`, `joint`,
    `patch` or `stacked` is asked for and cannot run here."""
    available = {"latent": latent_rerank_available(runner, store), "joint": joint_rerank_available(runner, store),
                 "patch": patch_rerank_available(runner, store)}
    available["stacked"] = available["latent"] and available["patch"]
    if requested == "auto":
        chosen = runner.search_defaults.get("rerank", "mixed")
        if available.get(chosen, True):
            return chosen
        return "latent" if available["latent"] else "mixed"  # e.g. an index built without patch tokens
    needed = requested
    if requested == "stacked":  # both halves: the one that cannot run says why
        needed = "patch" if available["latent"] else "latent"
    if not available.get(needed, True):
        has = {"latent": runner.model.latent_reranker, "joint": runner.reranker, "patch": runner.patch_reranker}
        kept, option = ("patch tokens", "--store-patches") if needed == "patch" else ("latents", "--store-latents")
        why = f"the model has no {needed} reranker" if has[needed] is None else \
            f"this index keeps no {kept} (index it with {option})"
        raise SearchError(f"rerank={requested} is not available: {why}", "rerank")
    return requested


def patch_weight(runner: ModelRunner) -> float:
    """The patch reranker's weight in the stacked sum: the model's search_defaults.json
    `patch_weight`, else 1."""
    return float(runner.search_defaults.get("patch_weight", 1.0))


def with_model_defaults(request: SearchRequest, runner: ModelRunner, mode: str) -> SearchRequest:
    """`request` with what it left open filled in from the model's search_defaults.json (else
    the engine's defaults), and the depth checked against the reranker it resolves to."""
    defaults = runner.search_defaults
    rerank_k = request.rerank_k if request.rerank_k is not None else int(defaults.get("rerank_k", DEFAULT_RERANK_K))
    fusion = request.fusion if request.fusion is not None else defaults.get("fusion", DEFAULT_FUSION)
    check_rerank_depth(mode, rerank_k)
    return dataclasses.replace(request, rerank_k=rerank_k, fusion=fusion)


def stored_scores(
    runner: ModelRunner, store: StoreBase, mode: str, rerank_state: np.ndarray, latents: np.ndarray | None,
    ids: np.ndarray,
) -> np.ndarray:
    """Rerank logits of one query against the segments `ids`, from what the index stored:
    `mode` mixed (the query's rerank state, (D + H,)), latent, joint, patch or stacked (its
    latents, (N, D))."""
    if mode == "mixed":
        states = store.rerank_states(ids)  # (K, D + H): read from the memory map
        return runner.mixed_scores(rerank_state[None], states[None])[0]
    if mode == "latent":
        return runner.latent_scores(latents, store.latents(ids))  # (K, N, D) stored
    if mode == "joint":
        return runner.joint_scores(latents, store.latents(ids))
    if mode == "patch":
        return runner.patch_scores(latents, store.patch_tokens(ids))
    if mode == "stacked":
        patch = runner.patch_scores(latents, store.patch_tokens(ids))
        return runner.latent_scores(latents, store.latents(ids)) + patch_weight(runner) * patch
    raise ValueError(f"rerank mode {mode!r} does not score from stored rows")
