"""Perceiver-VL: iterative latent cross-attention encoder, cross-attention decoder, and the
three ways to score a (video, text) pair (single-, multi- and mixed-stream; paper Fig. 2).

Shapes: B batch, F frames, M input tokens, N latents, D hidden, H heads, dh = D / H,
L text tokens, d embedding size, K candidates, Q queries, W = D + H (rerank-state width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvl_search.model.config import ModelConfig
from pvl_search.model.embeddings import TEXT, VIDEO, TextEmbedding, VideoEmbedding
from pvl_search.model.layers import MLP, CrossAttentionBlock, SelfAttentionBlock, split_heads


@dataclass
class Encoding:
    latents: Tensor  # (B, N, D) the latent array z
    embedding: Tensor  # (B, d) pooled, projected, L2-normalised: the multi-stream vector
    inputs: Tensor | None = None  # (B, M, D) the input tokens, when asked for (training heads)


class PerceiverEncoder(nn.Module):
    """k blocks of [one cross-attention from the latents onto the inputs, then l self-attentions].

    Cost is O(k M N + k l N^2): linear in the number of input tokens M.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden
        self.latents = nn.Parameter(torch.randn(config.latents, d) * 0.02)
        self.latent_position = nn.Parameter(torch.randn(config.latents, d) * 0.02)
        block_args = dict(heads=config.heads, mlp_ratio=config.mlp_ratio)
        self.cross = nn.ModuleList(CrossAttentionBlock(d, **block_args) for _ in range(config.blocks))
        self.layers = nn.ModuleList(
            SelfAttentionBlock(d, **block_args) for _ in range(config.blocks * config.self_layers)
        )
        self.norm = nn.LayerNorm(d)

    def active_cross_layers(self, cross_layers: int | None) -> list[bool]:
        """Which cross-attentions run in this pass.

        Inference keeps the first `cross_layers` (all by default). Training applies
        LayerDrop: each cross-attention but the first is skipped with probability p_LD.
        """
        k = self.config.blocks
        keep = k if cross_layers is None else cross_layers
        if not 1 <= keep <= k:
            raise ValueError(f"cross_layers must be between 1 and {k}; got {keep}")
        active = [i < keep for i in range(k)]
        if self.training and self.config.layerdrop > 0:
            drops = torch.rand(k) < self.config.layerdrop
            active = [a and (i == 0 or not bool(drops[i])) for i, a in enumerate(active)]
        return active

    def forward(self, inputs: Tensor, input_mask: Tensor, cross_layers: int | None = None) -> Tensor:
        b = inputs.shape[0]
        z = (self.latents + self.latent_position).to(inputs.dtype).expand(b, -1, -1)  # (B, N, D)
        per_block = self.config.self_layers
        for i, use_cross in enumerate(self.active_cross_layers(cross_layers)):
            if use_cross:
                z = self.cross[i](z, inputs, input_mask)
            for layer in self.layers[i * per_block : (i + 1) * per_block]:
                z = layer(z)
        return self.norm(z)


class Decoder(nn.Module):
    """One cross-attention from a task query array onto a latent encoding (paper section 3.3)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.block = CrossAttentionBlock(config.hidden, heads=config.heads, mlp_ratio=config.mlp_ratio)
        self.norm = nn.LayerNorm(config.hidden)

    def forward(self, queries: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        return self.norm(self.block(queries, context, context_mask))


class LatentReranker(nn.Module):
    """Scores (query, candidate) pairs from the query's text latents and the candidate's video
    latents: each text latent attends over the video latents (one cross-attention, heads H).

    Two readouts are summed: an MLP + head over the mean of the attended values added to the
    mean text latent, and a learned weighting of each head's mean log-normaliser (how strongly
    the text latents found matching video latents, a soft late-interaction match).
    The attention output is averaged over text latents before the output projection (linear,
    so the order does not change the result) to keep K candidates x Q queries cheap.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.hidden
        self.heads = config.heads
        self.norm_query = nn.LayerNorm(d)
        self.norm_context = nn.LayerNorm(d)
        self.to_q = nn.Linear(d, d)
        self.to_kv = nn.Linear(d, 2 * d)
        self.to_out = nn.Linear(d, d)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = MLP(d, ratio=config.mlp_ratio)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)
        self.match = nn.Linear(config.heads, 1)

    def forward(self, text_latents: Tensor, video_latents: Tensor) -> Tensor:
        """text_latents (Q, N, D), video_latents (K, M, D) -> logits (Q, K) of every pair."""
        heads, (nq, n), (nk, m) = self.heads, text_latents.shape[:2], video_latents.shape[:2]
        dh = text_latents.shape[-1] // heads
        q = split_heads(self.to_q(self.norm_query(text_latents)), heads)  # (Q, H, N, dh)
        k, v = (split_heads(t, heads) for t in self.to_kv(self.norm_context(video_latents)).chunk(2, dim=-1))
        # One matmul per head over all pairs, laid out so each softmax runs over contiguous memory.
        q_rows = q.transpose(0, 1).reshape(heads, nq * n, dh)  # (H, Q*N, dh)
        k_cols = k.permute(1, 3, 0, 2).reshape(heads, dh, nk * m)  # (H, dh, K*M)
        logits = (q_rows @ k_cols).view(heads, nq, n, nk, m) / math.sqrt(dh)  # (H, Q, N, K, M)
        lse = torch.logsumexp(logits.float(), dim=-1)  # (H, Q, N, K)
        weights = (logits - lse[..., None].to(logits.dtype)).exp().mean(2)  # (H, Q, K, M): mean over text
        pooled = weights.transpose(1, 2) @ v.transpose(0, 1)  # (H, K, Q, dh)
        pooled = pooled.permute(2, 1, 0, 3).reshape(nq, nk, heads * dh)  # (Q, K, D)
        x = text_latents.mean(1)[:, None] + self.to_out(pooled)  # residual onto the pooled query
        x = x + self.mlp(self.norm_mlp(x))
        match = lse.mean(2).permute(1, 2, 0)  # (Q, K, H): how well each head's text latents matched
        score = self.head(self.norm(x))[..., 0] + self.match(match.to(x.dtype))[..., 0]
        return score.float()


class PerceiverVL(nn.Module):
    """The whole model. Public entry points: encode_video / encode_text (multi-stream),
    rerank_state / mixed_scores (mixed-stream, factorised), single_stream_scores, mlm_logits.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden
        self.video_embed = VideoEmbedding(config)
        self.text_embed = TextEmbedding(config)
        self.modality = nn.Parameter(torch.randn(2, d) * 0.02)
        self.encoder = PerceiverEncoder(config)
        self.decoder = Decoder(config)
        # Task query arrays: VTM = one learned [CLS]; MLM = text position + mask indicator.
        self.vtm_query = nn.Parameter(torch.randn(d) * 0.02)
        self.vtm_head = nn.Linear(d, 1)
        self.mlm_position = nn.Parameter(torch.randn(config.text_length, d) * 0.02)
        self.mlm_indicator = nn.Parameter(torch.randn(2, d) * 0.02)
        self.mlm_head = nn.Sequential(
            nn.Linear(d, config.token_dim or d), nn.GELU(), nn.LayerNorm(config.token_dim or d)
        )
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        # Multi-stream heads (CLIP-style): pooled latents -> d, and a learned temperature.
        self.video_proj = nn.Linear(d, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(d, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.latent_reranker = LatentReranker(config) if config.latent_reranker else None

    @property
    def dtype(self) -> torch.dtype:
        return self.modality.dtype

    # ---------------------------------------------------------------- inputs
    def video_inputs(self, frames: Tensor, frame_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        tokens, mask = self.video_embed(frames.to(self.dtype), frame_mask)
        return tokens + self.modality[VIDEO], mask

    def text_inputs(self, token_ids: Tensor, replace_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        tokens, mask = self.text_embed(token_ids, replace_mask)
        return tokens + self.modality[TEXT], mask

    # ---------------------------------------------------------------- multi-stream
    def encode_video(
        self, frames: Tensor, frame_mask: Tensor | None = None, *, cross_layers: int | None = None,
        keep_inputs: bool = False,
    ) -> Encoding:
        """frames (B, F, 3, S, S) normalised, frame_mask (B, F) True for real frames."""
        tokens, mask = self.video_inputs(frames, frame_mask)
        latents = self.encoder(tokens, mask, cross_layers)
        return Encoding(latents, self._embed(latents, self.video_proj), tokens if keep_inputs else None)

    def encode_text(
        self, token_ids: Tensor, *, cross_layers: int | None = None, replace_mask: Tensor | None = None
    ) -> Encoding:
        """token_ids (B, L) from pvl_search.model.tokenizer; id 0 is padding."""
        latents = self.encoder(*self.text_inputs(token_ids, replace_mask), cross_layers)
        return Encoding(latents, self._embed(latents, self.text_proj))

    @staticmethod
    def _embed(latents: Tensor, proj: nn.Linear) -> Tensor:
        return F.normalize(proj(latents.mean(dim=1)).float(), dim=-1)  # (B, d)

    # ---------------------------------------------------------------- single-stream
    def single_stream_scores(
        self,
        frames: Tensor,
        frame_mask: Tensor | None,
        token_ids: Tensor,
        *,
        cross_layers: int | None = None,
    ) -> Tensor:
        """VTM logits (B,) of B (video, text) pairs encoded jointly: the most accurate, and
        nothing can be pre-computed."""
        video, video_mask = self.video_inputs(frames, frame_mask)
        text, text_mask = self.text_inputs(token_ids)
        latents = self.encoder(torch.cat([video, text], 1), torch.cat([video_mask, text_mask], 1), cross_layers)
        return self.vtm_logits(latents)

    # ---------------------------------------------------------------- decoder heads
    def vtm_logits(self, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """Plain VTM decoder: [CLS] cross-attends onto context (B, M, D) -> logits (B,)."""
        query = self.vtm_query.to(context.dtype).expand(context.shape[0], 1, -1)
        return self.vtm_head(self.decoder(query, context, context_mask))[:, 0, 0].float()

    def mixed_scores_plain(self, video_latents: Tensor, text_latents: Tensor) -> Tensor:
        """Mixed-stream VTM logits (K,) by running the decoder over concat(z_V, z_L).

        The reference for `mixed_scores`; K candidates cost K decoder passes over 2N tokens.
        """
        text_latents = text_latents.expand(video_latents.shape[0], -1, -1)
        return self.vtm_logits(torch.cat([video_latents, text_latents], dim=1))

    def mlm_logits(self, latents: Tensor, masked: Tensor) -> Tensor:
        """Vocabulary logits (B, L, V) at every text position; `masked` (B, L) marks the
        positions that were hidden from the encoder. The decoder never sees the tokens."""
        length = masked.shape[1]
        queries = self.mlm_position[:length] + self.mlm_indicator[masked.long()]  # (B, L, D)
        hidden = self.mlm_head(self.decoder(queries.to(latents.dtype), latents))
        return self.text_embed.output_logits(hidden) + self.mlm_bias

    # ---------------------------------------------------------------- mixed-stream, factorised
    #
    # The VTM query is a learned constant, so the decoder's cross-attention over
    # concat(z_V, z_L) splits exactly. Per head h, a context token c (after the context
    # norm) gets the logit u_h . c, with u_h = W_k,h^T q_h / sqrt(dh) fixed; its bias term
    # is the same for every token and cancels in the softmax. So each side reduces to
    #   lse_h = logsumexp_j(u_h . c_j)        and   m_h = W_v,h (sum_j softmax_j c_j) + b_v,h
    # and the head output over both sides is (e^lse_V m_V + e^lse_L m_L) / (e^lse_V + e^lse_L).
    # A side's contribution is therefore W = D + H numbers: its "rerank state".

    def rerank_state(self, latents: Tensor, latent_mask: Tensor | None = None) -> Tensor:
        """(B, N, D) latents -> (B, D + H) state: per-head value means, then log-normalisers."""
        block = self.decoder.block
        heads, dh = self.config.heads, self.config.head_dim
        context = block.norm_context(latents)  # (B, N, D)
        query = block.attn.to_q(block.norm_query(self.vtm_query.to(latents.dtype)))  # (D,)
        w_k = block.attn.to_kv.weight[: self.config.hidden]  # (D_out, D_in), keys
        u = (query.view(heads, dh, 1) * w_k.view(heads, dh, -1)).sum(1) / math.sqrt(dh)  # (H, D)
        logits = torch.einsum("bnd,hd->bhn", context, u)  # (B, H, N)
        if latent_mask is not None:
            logits = logits.masked_fill(~latent_mask[:, None, :], float("-inf"))
        lse = torch.logsumexp(logits.float(), dim=-1)  # (B, H)
        pooled = torch.einsum("bhn,bnd->bhd", logits.softmax(-1), context)  # (B, H, D)
        w_v = block.attn.to_kv.weight[self.config.hidden :].view(heads, dh, -1)  # (H, dh, D)
        b_v = block.attn.to_kv.bias[self.config.hidden :].view(heads, dh)
        means = torch.einsum("bhd,hed->bhe", pooled, w_v) + b_v  # (B, H, dh)
        return torch.cat([means.flatten(1).float(), lse], dim=-1)

    def mixed_scores(self, query_state: Tensor, video_states: Tensor) -> Tensor:
        """Mixed-stream VTM logits from rerank states, all candidates in one batched call.

        query_state (W,) or (Q, W); video_states (K, W) or (Q, K, W) -> (K,) or (Q, K).
        Per candidate this costs the decoder's output projection, MLP and head on one vector.
        """
        d, dh = self.config.hidden, self.config.head_dim
        single_query = query_state.dim() == 1
        if single_query:
            query_state = query_state[None]
        if video_states.dim() == 2:
            video_states = video_states[None]
        q = query_state[:, None, :].float()  # (Q, 1, W)
        v = video_states.float()  # (Q or 1, K, W)
        lse_q, lse_v = q[..., d:], v[..., d:]  # (., ., H)
        total = torch.logaddexp(lse_q, lse_v)
        weight_q = (lse_q - total).exp().repeat_interleave(dh, dim=-1)  # (Q, K, D)
        weight_v = (lse_v - total).exp().repeat_interleave(dh, dim=-1)
        mixed = weight_q * q[..., :d] + weight_v * v[..., :d]  # (Q, K, D) head outputs
        block = self.decoder.block
        x = self.vtm_query + block.attn.to_out(mixed.to(self.dtype))  # residual onto [CLS]
        x = x + block.mlp(block.norm_mlp(x))
        scores = self.vtm_head(self.decoder.norm(x))[..., 0].float()  # (Q, K)
        return scores[0] if single_query else scores

    def latent_scores(self, text_latents: Tensor, video_latents: Tensor) -> Tensor:
        """Latent-reranker logits (Q, K) of Q queries' text latents (Q, N, D) against K
        candidates' stored video latents (K, N, D); needs config.latent_reranker."""
        if self.latent_reranker is None:
            raise ValueError("this model has no latent reranker (config.latent_reranker is off)")
        return self.latent_reranker(text_latents, video_latents.to(text_latents.dtype))

    # ---------------------------------------------------------------- training helpers
    def multi_stream_logits(self, video_embedding: Tensor, text_embedding: Tensor) -> Tensor:
        """Temperature-scaled similarity matrix (B_text, B_video) for the contrastive loss."""
        return self.logit_scale.exp().clamp(max=100) * text_embedding @ video_embedding.T

    @property
    def retrieval_scale(self) -> float:
        """The contrastive temperature scale: a similarity times this is a trained logit."""
        return float(self.logit_scale.detach().exp().clamp(max=100))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

