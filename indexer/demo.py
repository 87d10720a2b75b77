"""The demo workflow (`pvl-search demo`): make a synthetic corpus the model has never seen and
one long video of several events, index them, answer a few example queries (one of them an
event inside the long video) and evaluate every caption as a query, and the long video's
events as moments."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from indexer.encoding import ModelRunner
from indexer.evaluate.driver import evaluate_index
from indexer.evaluate.moments import evaluate_moments, moment_queries
from indexer.evaluate.report import EvalReport, MomentReport
from indexer.ingest.pipeline import IndexSummary, build_index
from indexer.search.searcher import Searcher, SearchResult
from indexer.store.index_store import IndexStore
from pvl_search.data.captions import load_captions
from pvl_search.data.long_synth import generate_long_corpus
from pvl_search.data.synth import generate_corpus

STEPS = 4
EXAMPLES = 3  # example queries, spread over the corpus
EXAMPLE_K = 3  # videos per example query; the rerank depth is the search default's
EVAL_RERANK_KS = (4, 8, 16)  # and the search default's K
LONG_EVENTS = 8  # events of the demo's long video (about 30 s)


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
    span: tuple[float, float] | None = None  # where in that video the caption happens (a long video's event)


@dataclass
class DemoResult:
    index_dir: Path
    indexed: IndexSummary
    examples: list[DemoExample]
    report: EvalReport
    moments: MomentReport | None = None  # the long video's events, searched as a user would


def run_demo(out: Path, n: int, seed: int, runner: ModelRunner,
             progress: Callable[[DemoStep], None] | None = None) -> DemoResult:
    """Corpus in `out`/corpus, index in `out`/index; rerunning reuses both (nothing is redone)."""
    def step(number: int, message: str) -> None:
        if progress:
            progress(DemoStep(number, message))

    corpus, long_corpus, index_dir = out / "corpus", out / "long", out / "index"
    step(1, f"making {n} synthetic videos in {corpus} and a long one of {LONG_EVENTS} events in {long_corpus}")
    summary = generate_corpus(corpus, n, seed, size=runner.config.frame_size, splits=(0.0, 0.0, 1.0))
    long_summary = generate_long_corpus(long_corpus, 1, LONG_EVENTS, seed, size=runner.config.frame_size)
    step(2, f"indexing them into {index_dir}")
    with IndexStore(index_dir) as store:
        indexed = build_index([corpus / "videos", long_corpus / "videos"], store, runner)
    records = load_captions(summary.captions_path)
    long_record = load_captions(long_summary.captions_path)[0]
    step(3, "example queries")
    examples = []
    with Searcher(index_dir, runner=runner) as searcher:
        for record in records[:: max(1, len(records) // EXAMPLES)][:EXAMPLES]:
            query = record.captions[0]
            result = searcher.search(query, k=EXAMPLE_K)  # the search default: rerank mode, K, fusion
            examples.append(DemoExample(query, str(record.path), result))
        event = LONG_EVENTS // 2  # a moment in the middle of the long video
        query, span = long_record.captions[event], long_record.meta["moments"][event]
        examples.append(DemoExample(query, str(long_record.path), searcher.search(query, k=EXAMPLE_K), tuple(span)))
        step(4, "evaluating every caption as a query, and the long video's events as moments")
        default_k = searcher.default_request("").rerank_k
        report = evaluate_index(searcher, summary.captions_path, split="test",
                                rerank_ks=sorted({*EVAL_RERANK_KS, default_k}), exhaustive_limit=0)
        moments = evaluate_moments(searcher, moment_queries([long_record], "test"))
    return DemoResult(index_dir, indexed, examples, report, moments)
