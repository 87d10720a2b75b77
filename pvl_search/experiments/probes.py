"""`pvl-search probe`: linear probes of a model, fitted on one split of a synthetic captions
file and scored on another. The probes themselves are pvl_search.training.probes (training's
validation runs them too); this module loads the splits.
"""

from __future__ import annotations

from pathlib import Path

from pvl_search.data.pairs import load_pair_sets
from pvl_search.model.perceiver import PerceiverVL
from pvl_search.training.probes import probe_features, run_probes


def probe_model(model: PerceiverVL, captions_path: str, cache_dir: str, *, fit_split: str = "train",
                test_split: str = "test", limit: int | None = None) -> dict[str, dict[str, float]]:
    """Probes of `model` fitted on one split of a synthetic captions file and scored on another."""
    if fit_split == test_split:
        raise ValueError(f"probes must be fitted and tested on different splits; both are {fit_split!r}")
    sets, _ = load_pair_sets(captions_path, model.config, Path(cache_dir), limit=limit,
                             splits=(fit_split, test_split))
    return run_probes(probe_features(model, sets[fit_split]), probe_features(model, sets[test_split]))
