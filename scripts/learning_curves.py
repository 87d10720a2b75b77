"""Learning curves of a training run, from its log.jsonl, as one PNG for the model card.

Three panels against samples seen: validation R@1 of retrieval alone and of each reranker;
twin-group diagnostics (group R@1, within-group top-1) of retrieval; linear-probe accuracy of
the video and text embeddings per attribute (when the run logged probes).

    python scripts/learning_curves.py /work/runs/long1/log.jsonl pvl_search/model/weights/tiny-synth/curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_epochs(log: Path, batch_size: int) -> list[dict]:
    """Validated epoch records, each with `samples` = steps x batch size."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    epochs = [r for r in rows if r.get("kind") == "epoch" and "val_multi" in r]
    for r in epochs:
        r["samples"] = r["step"] * batch_size
    return epochs


def plot(epochs: list[dict], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install 'pvl-search[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["samples"] / 1000 for r in epochs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    methods = [m for m in ("multi", "reranked", "latent_reranked", "mixed", "latent") if f"val_{m}" in epochs[-1]]
    for m in methods:
        axes[0].plot(x, [r[f"val_{m}"]["r1"] for r in epochs], label=m, marker=".")
    axes[0].set_title("validation R@1")
    for key, style in (("group_r1", "-"), ("within_group_top1", "--")):
        axes[1].plot(x, [r["val_groups"]["multi"][key] for r in epochs if "val_groups" in r], style,
                     label=f"retrieval {key}")
    axes[1].set_title("twin groups (retrieval alone)")
    if "val_probes" in epochs[-1]:
        probed = [r for r in epochs if "val_probes" in r]
        for feature, style in (("video_embedding", "-"), ("text_embedding", "--")):
            for attr in ("shape", "motion", "order", "colour"):
                axes[2].plot([r["samples"] / 1000 for r in probed], [r["val_probes"][feature][attr] for r in probed],
                             style, label=f"{feature.split('_')[0]} {attr}")
    axes[2].set_title("linear probes on validation (accuracy)")
    for ax in axes:
        ax.set_xlabel("thousand samples seen")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    epochs = read_epochs(args.log, args.batch_size)
    if not epochs:
        raise SystemExit(f"{args.log}: no validated epochs yet")
    plot(epochs, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
