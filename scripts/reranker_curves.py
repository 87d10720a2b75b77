"""Learning curves of a joint-reranker run (`pvl-search train-reranker`): validation R@1 of
retrieval alone and after the joint rerank at each K, within-group top-1 and group R@1, per chunk.

usage: python scripts/reranker_curves.py RUN/log.jsonl OUT.png   (needs the plot extra)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(log: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    chunks = [line["chunk"] + 1 for line in lines]
    methods = list(lines[0]["val"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric, title in zip(axes, ("r1", "within_group_top1", "group_r1"),
                                 ("validation R@1", "within-group top-1", "group R@1")):
        for method in methods:
            ax.plot(chunks, [line["val"][method][metric] for line in lines], marker="o", label=method)
        ax.set_title(title)
        ax.set_xlabel("chunks trained (2,048 fresh videos each)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
