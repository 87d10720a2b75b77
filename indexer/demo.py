"""The demo workflow (`pvl-search demo`): make a synthetic corpus the model has never seen,
index it, answer a few example queries and evaluate every caption as a query."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from indexer.encoding import ModelRunner
from indexer.evaluate.driver import evaluate_index
from indexer.evaluate.report import EvalReport
from indexer.ingest.pipeline import IndexSummary, build_index
from indexer.search.searcher import Searcher, SearchResult
from indexer.store.index_store import IndexStore
from pvl_search.data.captions import load_captions
from pvl_search.data.synth import generate_corpus

STEPS = 4
EXAMPLES = 3  # example queries, spread over the corpus
EXAMPLE_K = 3  # videos per example query; the rerank depth is the search default's
EVAL_RERANK_KS = (4, 8, 16)  # and the search default's K


@dataclass(frozen=True)
class DemoStep:
    """Progress: step `number` of STEPS begins; `message` says what it does."""

    number: int
    message: str


@dataclass
class DemoExample:
    query: str
    wanted: str  # the path of the video the caption was written for
    result: SearchResult


@dataclass
class DemoResult:
    index_dir: Path
    indexed: IndexSummary
    examples: list[DemoExample]
    report: EvalReport


def run_demo(out: Path, n: int, seed: int, runner: ModelRunner,
             progress: Callable[[DemoStep], None] | None = None) -> DemoResult:
    """Corpus in `out`/corpus, index in `out`/index; rerunning reuses both (nothing is redone)."""
    def step(number: int, message: str) -> None:
        if progress:
            progress(DemoStep(number, message))

    corpus, index_dir = out / "corpus", out / "index"
    step(1, f"making {n} synthetic videos in {corpus}")
    summary = generate_corpus(corpus, n, seed, size=runner.config.frame_size, splits=(0.0, 0.0, 1.0))
    step(2, f"indexing them into {index_dir}")
    with IndexStore(index_dir) as store:
        indexed = build_index([corpus / "videos"], store, runner)
    records = load_captions(summary.captions_path)
    step(3, "example queries")
    examples = []
    with Searcher(index_dir, runner=runner) as searcher:
        for record in records[:: max(1, len(records) // EXAMPLES)][:EXAMPLES]:
            query = record.captions[0]
            result = searcher.search(query, k=EXAMPLE_K)  # the search default: rerank mode, K, fusion
            examples.append(DemoExample(query, str(record.path), result))
        step(4, "evaluating every caption as a query")
        default_k = searcher.default_request("").rerank_k
        report = evaluate_index(searcher, summary.captions_path, split="test",
                                rerank_ks=sorted({*EVAL_RERANK_KS, default_k}), exhaustive_limit=0)
    return DemoResult(index_dir, indexed, examples, report)
