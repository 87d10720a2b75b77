"""Joining (or starting) Ray for the commands that take `--ray local|auto|ray://HOST:PORT`.

Shared by `pvl-search index --ray` (indexer/ingest/ray_producer.py) and `pvl-search shards
--ray` (pvl_search/shards/writer.py). It lives in pvl_search, which never imports indexer, so
every failure is a `RayConnectError` of its own; the indexer turns it into its IndexStoreError.
Each message is one line that names pvl-search's flags, never Ray's.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import warnings
from typing import Any

RAY_CONNECT_TIMEOUT_S = 10.0  # ray://: the client port must accept a TCP connection within this


class RayConnectError(RuntimeError):
    """Ray is missing, or no cluster could be joined or started: one line for the user."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayConnectError("--ray needs the cluster extra: pip install 'pvl-search[cluster]'") from None
    return ray


def connect(address: str, workers: int, gpus_per_worker: float) -> bool:
    """Join (or, for "local", start) Ray unless this process already did; True when this
    call started it (and so must shut it down). Every failure is one RayConnectError line
    (a malformed address: ValueError)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address == "local":
        _start_local(ray, workers, gpus_per_worker)
    elif address == "auto":
        try:
            ray.init(address="auto", log_to_driver=False, configure_logging=False)
        except ConnectionError as error:
            if "Could not find any running Ray instance" in str(error):  # Ray's advice names its own CLI flags
                raise RayConnectError("no Ray cluster found for --ray auto; start one with `ray start --head` "
                                      "or use --ray local") from None
            raise RayConnectError(f"cannot join the Ray cluster for --ray auto: {first_line(error)}") from None
    elif address.startswith("ray://"):
        _join_client(ray, address)
    else:
        raise ValueError(f"--ray must be local, auto or ray://HOST:PORT, not {address!r}")
    return True


def _start_local(ray: Any, workers: int, gpus_per_worker: float) -> None:
    """Start a private Ray here, trying twice: on a loaded machine its node can miss Ray's
    fixed 30 s startup wait once and start the next time."""
    for attempt in (1, 2):
        try:
            # Few resources and a small object store: results are streamed and written at once.
            ray.init(num_cpus=workers, num_gpus=math.ceil(workers * gpus_per_worker) or None,
                     include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False,
                     configure_logging=False)
            return
        except Exception as error:  # noqa: BLE001 - Ray raises a bare Exception when its node times out
            with contextlib.suppress(Exception):
                ray.shutdown()
            if attempt == 2:
                raise RayConnectError(f"Ray did not start for --ray local ({first_line(error)}); "
                                      f"Ray's logs: {_local_logs()}") from None


def _local_logs() -> str:
    """The log folder of the Ray session started last on this machine."""
    try:
        from ray._common.utils import get_default_ray_temp_dir  # private, hence the fallback
        temp = get_default_ray_temp_dir()
    except Exception:  # noqa: BLE001
        temp = os.path.join(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp", "ray")
    return os.path.join(os.path.realpath(os.path.join(temp, "session_latest")), "logs")


def _join_client(ray: Any, address: str) -> None:
    """Connect to a Ray client server. The port is tried first: Ray alone retries a dead
    address for about 30 s and then says "ray client connection timeout" without naming it."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray must be local, auto or ray://HOST:PORT, not {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = "timed out" if isinstance(error, TimeoutError) else (error.strerror or str(error))
        raise RayConnectError(f"cannot reach the Ray cluster at {address} ({reason})") from None
    with warnings.catch_warnings():  # Ray's UserWarning about client ports repeats the error in two lines
        warnings.filterwarnings("ignore", module=r"ray\.")
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except ConnectionError as error:
            raise RayConnectError(f"cannot connect to the Ray cluster at {address} ({first_line(error)})") from None


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
