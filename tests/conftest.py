"""Shared fixtures: a private PostgreSQL server for the storage tests, `db_url`, which runs a
test once on SQLite and once on PostgreSQL with a fresh database each time, and a small
random model (`model_dir`, `runner`; a test file may define its own)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import torch
from index_helpers import CONFIG

from indexer.encoding import ModelRunner
from pvl_search.model.checkpoint import save_model
from pvl_search.model.perceiver import PerceiverVL


def _pg_bin() -> Path:
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    found.sort(key=lambda p: int(p.split("/")[4]))  # newest major version last
    if not found:
        pytest.fail(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): "
            "run the tests with scripts/test.sh, which installs them",
            pytrace=False,
        )
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """A throwaway PostgreSQL cluster on a free localhost port, with a database `pvl_test`;
    `stop()` kills it (immediate shutdown, as a crash would) and `start()` brings it back."""

    def __init__(self) -> None:
        self.bin_dir = _pg_bin()
        # initdb refuses to run as root: run the server as `postgres`, in a folder it owns
        # (pytest's tmp folders are private to root, so use a fresh one under /tmp).
        self.as_user: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="pvl-pg-"))
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        self.data, self.log, self.port = self.root / "data", self.root / "server.log", _free_port()
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-sync")
        self.start()
        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE pvl_test")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/pvl_test"

    def _run(self, *cmd: str) -> None:
        proc = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}", pytrace=False)

    def start(self) -> None:
        # fsync off: the tests kill the client (or the server on purpose), durability is moot.
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                        "stop"], capture_output=True)

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free localhost port; yields a URL to a database."""
    cluster = PgCluster()
    try:
        yield cluster.url
    finally:
        cluster.remove()


@pytest.fixture
def private_postgres() -> Iterator[PgCluster]:
    """A PostgreSQL cluster of this test's own, to stop, freeze or kill without harming others."""
    cluster = PgCluster()
    try:
        yield cluster
    finally:
        try:
            os.kill(cluster.postmaster_pid(), signal.SIGCONT)  # in case the test froze it
        except (OSError, ValueError):
            pass
        cluster.remove()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to a fresh, empty database: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'meta.sqlite'}"
        return
    server = request.getfixturevalue("postgres_url")
    base, _, _ = server.rpartition("/")
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = server.replace("postgresql+psycopg://", "postgresql://")  # libpq URI
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{base}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_model(PerceiverVL(CONFIG), tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> ModelRunner:
    return ModelRunner.from_folder(model_dir, device="cpu")
