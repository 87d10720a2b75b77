"""SQL schema of an index: videos, their segments, captions and one row of index metadata.

SQL is the source of truth of an index (the protocol in indexer/store/__init__.py): a segment exists once
its row is committed here, and its id is also its row number in the embedding, rerank-state
and latent stores and its id in the FAISS index. Schema changes go through migrations/.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints, so that batch migrations on SQLite (which rebuild tables) can find them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """An aware UTC datetime; a naive one is taken to be UTC already."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A point in time, stored and compared as UTC on every backend, read back aware.

    SQLite has no time zones: SQLAlchemy writes a datetime's wall-clock digits and drops the
    offset, so 12:00+14:00 would compare as 12:00 UTC. Converting every bound value (stored
    or compared) to UTC first makes SQLite order them as PostgreSQL's timestamptz does."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        return None if value is None else as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        return None if value is None else as_utc(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class VideoStatus(str, enum.Enum):
    INDEXED = "indexed"
    FAILED = "failed"  # could not be decoded or encoded; `error` says why
    REMOVED = "removed"  # the file is gone; its segments are flagged removed


class Video(Base):
    __tablename__ = "videos"
    __table_args__ = (
        CheckConstraint("status IN ('indexed', 'failed', 'removed')", name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The path as shown (indexer/paths.py): the file's own name when it is valid UTF-8, else a
    # readable form with \xNN escapes, and then the exact bytes in `path_bytes`.
    path: Mapped[str] = mapped_column(String, unique=True)
    path_bytes: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Size/mtime/fingerprint may be unknown for a file that failed before it could be read.
    size: Mapped[int | None] = mapped_column(BigInteger)
    mtime: Mapped[float | None] = mapped_column(Float)
    fingerprint: Mapped[str | None] = mapped_column(String(64))  # sha256 hex of size + head + tail
    duration: Mapped[float | None] = mapped_column(Float)  # seconds
    fps: Mapped[float | None] = mapped_column(Float)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    segments: Mapped[list[Segment]] = relationship(back_populates="video")


class Segment(Base):
    """One window of a video: one vector, one rerank-state row, one row in each store."""

    __tablename__ = "segments"

    # Not autoincremented: the id is the row number the stores gave it.
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    video_id: Mapped[int] = mapped_column(ForeignKey("videos.id"), index=True)
    start_s: Mapped[float] = mapped_column(Float)
    end_s: Mapped[float] = mapped_column(Float)
    # Rows stay in the append-only stores; a removed segment is only taken out of FAISS.
    removed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    video: Mapped[Video] = relationship(back_populates="segments")


class IndexInfo(Base):
    """The index's single metadata row (id = 1)."""

    __tablename__ = "index_info"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False, default=1)
    # Written into every store header and the FAISS file: a folder and a database that do
    # not belong together are refused instead of "recovered" (which would truncate data).
    index_uuid: Mapped[str] = mapped_column(String(32))
    model_config: Mapped[str | None] = mapped_column(Text)  # the model's config as JSON
    weights_fingerprint: Mapped[str | None] = mapped_column(String(128))
    # dtype(s) the model ran in to encode the segments, comma-separated in order of first use
    # ("bfloat16", or "bfloat16,float32" after a run in each); stored vectors are float
    # either way, so any dtype can search it. None: built before this was recorded.
    encode_dtype: Mapped[str | None] = mapped_column(String(64))
    embedding_dim: Mapped[int | None] = mapped_column(Integer)  # d
    rerank_width: Mapped[int | None] = mapped_column(Integer)  # D + H
    latent_tokens: Mapped[int | None] = mapped_column(Integer)  # N, when latents are kept
    latent_dim: Mapped[int | None] = mapped_column(Integer)  # D, when latents are kept
    patch_tokens: Mapped[int | None] = mapped_column(Integer)  # M, when patch tokens are kept
    patch_dim: Mapped[int | None] = mapped_column(Integer)  # D, when patch tokens are kept
    faiss_factory: Mapped[str | None] = mapped_column(String(128))  # None: automatic
    vector_store: Mapped[str | None] = mapped_column(String(1024))  # None: FAISS; "milvus:URI"
    # Crash-safety counters (the protocol in indexer/store/__init__.py): store rows that belong to
    # committed segments, and a counter bumped by every transaction that removes segments.
    committed_rows: Mapped[int] = mapped_column(BigInteger, default=0)
    removal_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
