"""The memory bank that mines the reranker's hard negatives from the whole training set."""

from __future__ import annotations

import torch

from pvl_search.training.negative_bank import NegativeBank


def test_mines_the_most_similar_filled_videos_outside_the_batch() -> None:
    bank = NegativeBank(videos=5, embed_dim=2, state_width=3)
    embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.3], [0.8, 0.2]])
    states = torch.arange(15, dtype=torch.float32).view(5, 3)
    bank.update(torch.tensor([0, 1, 2, 3]), embeddings[:4], states[:4])  # row 4 never seen
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mined, valid = bank.mine(text, batch_rows=torch.tensor([0, 2]), k=2)
    # caption 0: rows 0 and 2 are in the batch, row 4 is empty -> rows 1 then 3
    assert torch.equal(mined[0], states[[1, 3]]) and valid[0].all()
    # caption 1: most similar usable rows are 3 (0.3) then 1 (0.1)
    assert torch.equal(mined[1], states[[3, 1]])
    # asking for more than the bank can give marks the rest invalid
    _, valid = bank.mine(text, batch_rows=torch.tensor([0, 2]), k=4)
    assert valid.sum(1).tolist() == [2, 2]


def test_state_round_trips() -> None:
    bank = NegativeBank(3, 2, 2)
    bank.update(torch.tensor([1]), torch.ones(1, 2), torch.full((1, 2), 5.0))
    copy = NegativeBank(3, 2, 2)
    copy.load_state_dict(bank.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(bank.state_dict().values(), copy.state_dict().values()))
    assert copy.filled.tolist() == [False, True, False]
