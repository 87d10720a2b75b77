"""Text tokenisation with open_clip's BPE (its vocabulary ships inside the package)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=1)
def _bpe():  # noqa: ANN202 - open_clip's SimpleTokenizer; loading the vocabulary takes ~50 ms
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class Tokenizer:
    """Texts -> (B, text_length) token ids: <start> tokens <end>, padded with 0, truncated
    (keeping <end>) when longer."""

    def __init__(self, text_length: int) -> None:
        self.text_length = text_length
        bpe = _bpe()
        self.start_id = bpe.sot_token_id
        self.end_id = bpe.eot_token_id

    def token_count(self, text: str) -> int:
        """Tokens the text needs, <start> and <end> included, before truncation."""
        return len(_bpe().encode(text)) + 2

    def is_truncated(self, text: str) -> bool:
        return self.token_count(text) > self.text_length

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        return self.encode(texts)[0]

    def encode(self, texts: str | Sequence[str]) -> tuple[Tensor, list[bool]]:
        """(B, text_length) ids and, per text, whether it was truncated: one BPE pass each."""
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.zeros(len(texts), self.text_length, dtype=torch.long)
        truncated = []
        bpe = _bpe()
        for row, text in enumerate(texts):
            body = bpe.encode(text)
            truncated.append(len(body) + 2 > self.text_length)
            tokens = [self.start_id, *body[: self.text_length - 2], self.end_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, truncated
