"""Can a model configuration fit the synthetic twins at all? A fitting test, not a benchmark.

Trains a fresh model on the first N training videos of a captions file for many epochs and
scores it on those same videos: top-1 within each scene's hard-negative twins and group R@1
(see pvl_search.experiments.twins). If a configuration cannot separate twins it was trained on, no
amount of data will make it separate unseen ones.

    OMP_NUM_THREADS=1 python scripts/fit_twins.py --captions /work/data/synth2000/captions.json \\
        --out /tmp/fit-paper --videos 256 --epochs 100
    OMP_NUM_THREADS=1 python scripts/fit_twins.py ... --out /tmp/fit-context \\
        --text-mixer-layers 1 --temporal-kernel 3
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pvl_search.data.captions import load_captions
from pvl_search.data.pairs import PairSet, build_frame_cache
from pvl_search.experiments.twins import twin_scores
from pvl_search.metrics import group_metrics
from pvl_search.model.config import preset
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.model.tokenizer import Tokenizer
from pvl_search.training.loop import TrainConfig, train
from pvl_search.training.losses import LossWeights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", required=True)
    parser.add_argument("--out", required=True, help="run folder (frame cache, log, model)")
    parser.add_argument("--videos", type=int, default=256, help="first N videos of the train split")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--text-mixer-layers", type=int, default=0)
    parser.add_argument("--temporal-kernel", type=int, default=0)
    args = parser.parse_args()
    config = preset("tiny").replace(text_mixer_layers=args.text_mixer_layers, temporal_kernel=args.temporal_kernel)
    records = [r for r in load_captions(args.captions) if r.split == "train"][: args.videos]
    cache, _ = build_frame_cache([(r.video_id, str(r.path)) for r in records], f"{args.out}/frame-cache",
                                 frames=config.frames, size=config.frame_size)
    data = PairSet(cache, {r.video_id: r.captions for r in records}, Tokenizer(config.text_length),
                   groups={r.video_id: str(r.meta["group"]) for r in records})
    torch.manual_seed(0)
    model = PerceiverVL(config)
    # The shipped model's losses and schedule, without validation: the training set is the test.
    cfg = TrainConfig(epochs=args.epochs, batch_size=32, lr=5e-4, warmup_steps=100, seed=0,
                      checkpoint_every=10**9, losses=LossWeights(single_vtm=0.5, mixed_nce=1.0))
    began = time.perf_counter()
    train(model, data, None, cfg, args.out)
    by_method, owners = twin_scores(model, data)
    groups = np.asarray(data.groups)
    report = {name: group_metrics(s, owners, groups) for name, s in by_method.items()}
    print(json.dumps({"config": {"text_mixer_layers": args.text_mixer_layers, "temporal_kernel": args.temporal_kernel},
                      "videos": len(data), "epochs": args.epochs, "seconds": time.perf_counter() - began, **report},
                     indent=2))


if __name__ == "__main__":
    main()
