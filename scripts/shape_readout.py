"""Where is an object's shape lost on the video side? (pvl_search.experiments.shape_readout)

    python scripts/shape_readout.py tokens --model pvl_search/model/weights/tiny-synth \
        --train-captions /work/data/synth11/captions.json --test-captions /work/data/synth7/captions.json \
        --cache /tmp/readout-cache
    python scripts/shape_readout.py tower ... --steps 1500     # the model's video path, fine-tuned
    python scripts/shape_readout.py stem ... --steps 1500      # a fresh stem of the model's design

Fitted or trained on the train split of --train-captions (the whole of it for "tokens": at most
--token-videos), scored on the test split of --test-captions. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pvl_search.data.pairs import load_pair_sets, subset
from pvl_search.experiments.shape_readout import (
    StemReadout,
    VideoTowerReadout,
    majority_baseline,
    token_shape_probe,
    train_readout,
)
from pvl_search.model.checkpoint import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("readout", choices=("tokens", "tower", "stem"))
    parser.add_argument("--model", default="pvl_search/model/weights/tiny-synth")
    parser.add_argument("--train-captions", required=True)
    parser.add_argument("--test-captions", required=True)
    parser.add_argument("--cache", required=True, help="frame cache folder prefix (reused when complete)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--token-videos", type=int, default=400, help="training videos for the token probe")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_model(args.model)
    cache = Path(args.cache)
    train = load_pair_sets(args.train_captions, model.config, cache.with_name(cache.name + "-train"),
                           splits=("train",))[0]["train"]
    test = load_pair_sets(args.test_captions, model.config, cache.with_name(cache.name + "-test"),
                          splits=("test",))[0]["test"]
    if args.readout == "tokens":
        fit = subset(train, range(min(args.token_videos, len(train))))
        print(json.dumps(token_shape_probe(model, fit, test)))
        return
    print(json.dumps({"majority": majority_baseline(test)}), flush=True)
    readout = VideoTowerReadout(model) if args.readout == "tower" else StemReadout(model.config)
    train_readout(readout, train, test, steps=args.steps, lr=args.lr,
                  progress=lambda point: print(json.dumps(point), flush=True))


if __name__ == "__main__":
    main()
