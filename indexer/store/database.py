"""Connecting to an index's SQL database and bringing its schema up to date.

The default database is a SQLite file inside the index folder (WAL journal, foreign keys on);
any SQLAlchemy URL works instead, e.g. ``postgresql+psycopg://user@host/db`` for a shared
metadata server. ``open_database`` migrates the schema to the newest revision this version
knows, with Alembic run from code, and refuses a database written by a newer version.

Every failure of the database itself (unreachable, timed out, disk full, unreadable file)
reaches callers as one `DatabaseAccessError` line naming the database, never a driver trace.
PostgreSQL gets a connect timeout and a statement timeout (defaults below; override them in
the URL: ``?connect_timeout=5&statement_timeout=30``, seconds). A frozen server (SIGSTOP, a
hung host) cannot enforce its own statement timeout, so the client also stops waiting for a
reply a little after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.orm import Session, sessionmaker

import migrations
from indexer.errors import DatabaseAccessError, IndexStoreError, SchemaTooNewError

DEFAULT_DB_NAME = "index.sqlite"
MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent
PG_CONNECT_TIMEOUT_S = 10  # PostgreSQL: give up connecting after this long
PG_STATEMENT_TIMEOUT_S = 60  # PostgreSQL: the server cancels a statement running this long
_REPLY_GRACE_S = 5  # ... and the client stops waiting this much later (a frozen server)


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
        return one_line_errors(engine)
    return server_engine(url, pool_pre_ping=True)


def describe(url: str | URL) -> str:
    """The database as a user would name it: the URL without its password."""
    return make_url(url).render_as_string(hide_password=True)


def one_line_errors(engine: Engine) -> Engine:
    """Make every driver error of `engine` a DatabaseAccessError: one line naming the
    database and what went wrong (SQLAlchemy's own text adds the SQL and a web link)."""
    where = describe(engine.url)

    def translate(context: ExceptionContext) -> None:
        original = context.original_exception
        lines = str(original).strip().splitlines() or [type(original).__name__]
        raise DatabaseAccessError(f"database {where}: {lines[0].strip()}")

    event.listen(engine, "handle_error", translate)
    return engine


# psycopg >= 3.2 gives Connection.wait a deadline (`timeout`, raising this); with an older
# psycopg there is none to set, and only the server-side statement timeout holds.
_WAIT_TIMEOUT = getattr(psycopg.errors, "_WaitTimeout", None)


class _DeadlineConnection(psycopg.Connection):
    """A psycopg connection that stops waiting for a reply after `reply_timeout` seconds.

    psycopg sends every statement, commit and rollback through `wait`; without a limit a
    server that stopped answering (SIGSTOP, a frozen host) keeps the caller waiting forever.
    The connection is then in an unknown state, so it is closed (and not reused)."""

    reply_timeout: float | None = None

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        if _WAIT_TIMEOUT is None or self.reply_timeout is None or kwargs.get("timeout") is not None:
            return super().wait(gen, *args, **kwargs)
        try:
            return super().wait(gen, *args, **{**kwargs, "timeout": self.reply_timeout})
        except _WAIT_TIMEOUT:
            self.pgconn.finish()
            raise psycopg.OperationalError(
                f"no reply from the server in {self.reply_timeout:g} s (is it frozen or overloaded?)"
            ) from None


def _seconds(parsed: URL, name: str, default: float) -> float:
    raw = parsed.query.get(name, default)
    try:
        value = float(raw if isinstance(raw, (int, float, str)) else raw[-1])
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"database URL: {name} must be a positive number of seconds, got {raw!r}")
    return value


def server_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for a database server (not SQLite). PostgreSQL gets the connect and
    statement timeouts (module doc); its driver errors, like every backend's, are one line."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or parsed.get_driver_name() != "psycopg":
        return one_line_errors(create_engine(url, **kwargs))
    connect_s = _seconds(parsed, "connect_timeout", PG_CONNECT_TIMEOUT_S)
    statement_s = _seconds(parsed, "statement_timeout", PG_STATEMENT_TIMEOUT_S)
    given = parsed.query.get("options", "")
    options = " ".join([*([given] if isinstance(given, str) else given),
                        f"-c statement_timeout={math.ceil(statement_s * 1000)}"]).strip()
    parsed = parsed.difference_update_query(["connect_timeout", "statement_timeout", "options"])
    engine = create_engine(parsed, connect_args={"connect_timeout": max(1, math.ceil(connect_s)),
                                                 "options": options}, **kwargs)

    def connect(_dialect: Any, _record: Any, cargs: tuple, cparams: dict) -> psycopg.Connection:
        conn = _DeadlineConnection.connect(*cargs, **cparams)
        conn.reply_timeout = statement_s + _REPLY_GRACE_S
        return conn

    event.listen(engine, "do_connect", connect)
    return one_line_errors(engine)


def _sqlite_read_only_on_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # transactions begin with the "begin" event
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA query_only=ON")  # on top of mode=ro
    cursor.close()


def read_only_engine(url: str) -> Engine:
    """An engine that cannot write: SQLite opened with ``mode=ro`` (never creates or
    modifies the database file), PostgreSQL sessions ``READ ONLY``. Each session reads one
    snapshot (SQLite transactions are snapshots; PostgreSQL gets REPEATABLE READ)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database).resolve()
        query = {k: v for k, v in parsed.query.items() if k not in ("mode", "uri")}
        ro = parsed.set(
            database=f"file:{quote(str(path))}", query={**query, "mode": "ro", "uri": "true"}
        )
        engine = create_engine(ro, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_read_only_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return one_line_errors(engine)
    if parsed.get_backend_name() == "postgresql":
        return server_engine(
            url,
            pool_pre_ping=True,
            isolation_level="REPEATABLE READ",
            execution_options={"postgresql_readonly": True},
        )
    return server_engine(url, pool_pre_ping=True)


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
