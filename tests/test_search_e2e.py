"""End to end: synthetic corpus -> a tiny model overfit on it -> index -> search finds each
caption's own video first, through the library and through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cli
from indexer.encoding import ModelRunner
from indexer.ingest.pipeline import IndexOptions, build_index
from indexer.search.request import SearchError, SearchFilters
from indexer.search.searcher import Searcher
from indexer.store.index_store import IndexStore
from pvl_search.data.captions import load_captions
from pvl_search.data.synth import generate_corpus
from pvl_search.media.video import read_clip, to_model_input
from pvl_search.model.checkpoint import save_model
from pvl_search.model.config import preset
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.model.tokenizer import Tokenizer
from pvl_search.training.losses import LossWeights, compute_losses

CONFIG = preset("tiny").replace(
    hidden=96, heads=4, latents=16, frame_size=32, patch=8, frames=4, token_dim=32, layerdrop=0.0
)


def overfit(records, steps: int = 600) -> PerceiverVL:
    """Train until every caption's own video scores highest under multi and mixed streams."""
    clips = [read_clip(r.path, None, CONFIG.frames, CONFIG.frame_size) for r in records]
    frames, masks = to_model_input(np.stack([c.frames for c in clips]), np.stack([c.mask for c in clips]))
    tokenizer = Tokenizer(CONFIG.text_length)
    captions = [tokenizer(r.captions) for r in records]
    torch.manual_seed(0)
    model = PerceiverVL(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        model.train()
        ids = torch.stack([c[torch.randint(len(c), (1,), generator=g)][0] for c in captions])
        loss = compute_losses(model, frames, masks, ids, LossWeights()).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 24 and perfect(model, frames, masks, captions):
            break
    return model.eval()


@torch.no_grad()
def perfect(model: PerceiverVL, frames, masks, captions) -> bool:
    model.eval()
    video = model.encode_video(frames, masks)
    states = model.rerank_state(video.latents)
    for owner, ids in enumerate(captions):
        text = model.encode_text(ids)
        multi = text.embedding @ video.embedding.T
        mixed = model.mixed_scores(model.rerank_state(text.latents), states)
        if (multi.argmax(1) != owner).any() or (mixed.argmax(1) != owner).any():
            return False
    return True


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    generate_corpus(root / "corpus", 24, seed=3, size=64, fps=8, seconds=1.5, workers=1)
    # One video per group of hard-negative twins: this tests the engine, not the model.
    records = [r for r in load_captions(root / "corpus" / "captions.json") if r.video_id.endswith("_base")]
    model = overfit(records)
    save_model(model, root / "model")
    runner = ModelRunner.from_folder(root / "model")
    with IndexStore(root / "index") as store:
        summary = build_index([r.path for r in records], store, runner, IndexOptions(workers=1))
    assert summary.indexed == len(records) == 6 and not summary.failed
    return {"root": root, "records": records, "runner": runner}


@pytest.mark.parametrize("rerank", ["none", "mixed"])
def test_each_caption_finds_its_own_video_first(corpus: dict, rerank: str) -> None:
    with Searcher(corpus["root"] / "index", runner=corpus["runner"]) as searcher:
        for record in corpus["records"]:
            for caption in record.captions:
                hits = searcher.search(caption, k=3, rerank_k=8, rerank=rerank).hits
                assert hits[0].path == str(record.path), (rerank, caption)
                assert hits[0].best.start_s == 0.0 and hits[0].best.end_s == pytest.approx(1.5, abs=0.2)
                assert (hits[0].best.rerank_score is None) == (rerank == "none")


def test_single_rerank_scores_are_the_joint_encoders(corpus: dict) -> None:
    """`single` decodes the candidates again and runs the joint encoder: its rerank scores
    must equal single_stream_scores computed here from the same files."""
    runner, records = corpus["runner"], corpus["records"]
    query = records[1].captions[0]
    with Searcher(corpus["root"] / "index", runner=runner) as searcher:
        hits = searcher.search(query, k=6, rerank_k=6, rerank="single").hits
    assert len(hits) == 6
    clips = [read_clip(h.path, (h.best.start_s, h.best.end_s), CONFIG.frames, CONFIG.frame_size) for h in hits]
    frames, masks = to_model_input(np.stack([c.frames for c in clips]), np.stack([c.mask for c in clips]))
    with torch.no_grad():
        ids = runner.tokenizer([query]).expand(len(hits), -1)
        direct = runner.model.single_stream_scores(frames, masks, ids)
    assert [h.best.rerank_score for h in hits] == pytest.approx(direct.tolist(), abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_batch_of_queries_matches_single_queries(corpus: dict) -> None:
    captions = [r.captions[0] for r in corpus["records"]]
    with Searcher(corpus["root"] / "index", runner=corpus["runner"]) as searcher:
        batch = searcher.search_many(captions, k=3)
        one_by_one = [searcher.search(c, k=3) for c in captions]
    for a, b in zip(batch, one_by_one):
        assert [h.path for h in a.hits] == [h.path for h in b.hits]
        assert [h.score for h in a.hits] == pytest.approx([h.score for h in b.hits], abs=1e-4)


def test_filters_still_return_k_results(corpus: dict) -> None:
    target = corpus["records"][4]
    name = Path(target.path).name
    with Searcher(corpus["root"] / "index", runner=corpus["runner"]) as searcher:
        only = searcher.search(corpus["records"][0].captions[0], k=3, filters=SearchFilters(path_glob=f"*/{name}"))
        assert [h.path for h in only.hits] == [str(target.path)]
        none = searcher.search("anything", k=3, filters=SearchFilters(min_duration=100.0))
        assert none.hits == []
        unfiltered = searcher.search("a red circle", k=5, filters=SearchFilters(max_duration=100.0))
        assert len(unfiltered.hits) == 5


def test_bad_queries_are_refused(corpus: dict) -> None:
    with Searcher(corpus["root"] / "index", runner=corpus["runner"]) as searcher:
        for bad in ("", "   "):
            with pytest.raises(SearchError, match="empty"):
                searcher.search(bad)
        with pytest.raises(SearchError, match="k must be"):
            searcher.search("x", k=0)
        long = searcher.search("red " * 100, k=1)
        assert long.truncated and len(long.hits) == 1


def test_cli_search_json_and_errors(corpus: dict) -> None:
    root, record = corpus["root"], corpus["records"][2]
    runner = CliRunner()
    args = ["search", record.captions[0], "--index", str(root / "index"), "--model", str(root / "model")]
    result = runner.invoke(cli.app, [*args, "--json", "-k", "2"])
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(hits) == 2 and hits[0]["path"] == str(record.path) and hits[0]["rank"] == 1
    blank = runner.invoke(cli.app, ["search", "  ", "--index", str(root / "index"), "--model", str(root / "model")])
    assert blank.exit_code == 1 and "empty" in blank.stderr
    missing = runner.invoke(cli.app, ["search", "x", "--index", str(root / "nowhere"), "--model", str(root / "model")])
    assert missing.exit_code == 1 and "no index" in missing.stderr


def test_another_model_is_refused(corpus: dict, tmp_path) -> None:
    torch.manual_seed(1)
    save_model(PerceiverVL(CONFIG), tmp_path / "other")
    result = CliRunner().invoke(
        cli.app, ["search", "x", "--index", str(corpus["root"] / "index"), "--model", str(tmp_path / "other")]
    )
    assert result.exit_code == 1 and "model" in result.stderr
