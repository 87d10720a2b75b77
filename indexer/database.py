"""Connecting to an index's SQL database and bringing its schema up to date.

The default database is a SQLite file inside the index folder (WAL journal, foreign keys on);
any SQLAlchemy URL works instead, e.g. ``postgresql+psycopg://user@host/db`` for a shared
metadata server. ``open_database`` migrates the schema to the newest revision this version
knows, with Alembic run from code, and refuses a database written by a newer version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

import migrations
from indexer.errors import IndexStoreError, SchemaTooNewError

DEFAULT_DB_NAME = "index.sqlite"
MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent


def default_url(index_dir: str | Path) -> str:
    """The embedded default: a SQLite file inside the index folder."""
    return f"sqlite:///{Path(index_dir).resolve() / DEFAULT_DB_NAME}"


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event below own transactions: the sqlite3 module would
    # otherwise start them lazily (not before DDL or SELECT), which breaks atomicity.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # FULL: a commit is on disk when it returns, which the crash-safety protocol relies on.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN")


def create_engine_for(url: str) -> Engine:
    """An engine for `url`, with the SQLite settings the index needs when it is SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    return create_engine(url, pool_pre_ping=True)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: objects returned to callers stay readable after the commit.
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic configuration built in code, pointing at the installed `migrations` package."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise IndexStoreError(f"no schema migrations found in {MIGRATIONS_DIR}")
    return head


def current_revisions(connection: Connection) -> tuple[str, ...]:
    """The schema revision(s) stamped in the database; empty for a new database."""
    return tuple(MigrationContext.configure(connection).get_current_heads())


def migrate(engine: Engine) -> None:
    """Upgrade the schema to head, refusing a database stamped with an unknown revision."""
    cfg = alembic_config()
    known = {script.revision for script in ScriptDirectory.from_config(cfg).walk_revisions()}
    with engine.begin() as conn:
        unknown = [rev for rev in current_revisions(conn) if rev not in known]
        if unknown:
            raise SchemaTooNewError(
                f"database {engine.url.render_as_string(hide_password=True)} has schema "
                f"revision {', '.join(unknown)}, which this version of pvl-search does not "
                f"know (newest known: {head_revision()}); it was written by a newer version, "
                "upgrade pvl-search to open it"
            )
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@dataclass
class Database:
    """An engine with its session factory; `close()` releases the connections."""

    engine: Engine
    sessions: sessionmaker[Session]

    def close(self) -> None:
        self.engine.dispose()


def open_database(url: str) -> Database:
    """Connect to `url`, migrate its schema to head and return engine + session factory."""
    engine = create_engine_for(url)
    try:
        migrate(engine)
    except Exception:
        engine.dispose()
        raise
    return Database(engine=engine, sessions=session_factory(engine))
