"""Whether an index was built with a given model: the rule every open index applies before
it is searched or extended, and the one-line reason when it was not."""

from __future__ import annotations

import json
from pathlib import Path

from indexer.errors import IndexStoreError, ModelMismatchError


def check_same_model(
    directory: Path, stored_config: str | None, stored_fingerprint: str | None, config: str, fingerprint: str
) -> None:
    """Raise ModelMismatchError unless the index in `directory`, which records
    `stored_config` and `stored_fingerprint`, was built with this model."""
    if stored_config is None:
        raise IndexStoreError(f"index {directory} has no model recorded: nothing indexed yet")
    problems = model_mismatch(stored_config, stored_fingerprint, config, fingerprint)
    if problems:
        raise ModelMismatchError(
            f"index {directory} was built with a different model ({'; '.join(problems)}, "
            "index vs given); use the index's model or re-index into a new folder"
        )


def model_mismatch(stored_config: str, stored_fingerprint: str, config: str, fingerprint: str) -> list[str]:
    """What differs between the model an index records and the one given (empty: the same)."""
    problems = []
    if stored_fingerprint != fingerprint:
        problems.append(f"weights fingerprint {stored_fingerprint[:12]}... vs {fingerprint[:12]}...")
    if json.loads(stored_config) != json.loads(config):
        problems.append("config: " + _config_diff(stored_config, config))
    return problems


def _config_diff(stored: str, given: str) -> str:
    """The top-level config keys that differ, as 'key (stored vs given)'."""
    try:
        a, b = json.loads(stored), json.loads(given)
    except ValueError:
        return "config text differs"
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return "config differs"
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shown = ", ".join(f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in keys[:5])
    return shown + (" ..." if len(keys) > 5 else "")
