"""Initial schema: videos, segments, captions, index_info.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "videos",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("mtime", sa.Float(), nullable=True),
        sa.Column("fingerprint", sa.String(length=64), nullable=True),
        sa.Column("duration", sa.Float(), nullable=True),
        sa.Column("fps", sa.Float(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('indexed', 'failed', 'removed')", name=op.f("ck_videos_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_videos")),
        sa.UniqueConstraint("path", name=op.f("uq_videos_path")),
    )
    op.create_table(
        "index_info",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("index_uuid", sa.String(length=32), nullable=False),
        sa.Column("model_config", sa.Text(), nullable=True),
        sa.Column("weights_fingerprint", sa.String(length=128), nullable=True),
        sa.Column("embedding_dim", sa.Integer(), nullable=True),
        sa.Column("rerank_width", sa.Integer(), nullable=True),
        sa.Column("latent_tokens", sa.Integer(), nullable=True),
        sa.Column("latent_dim", sa.Integer(), nullable=True),
        sa.Column("faiss_factory", sa.String(length=128), nullable=True),
        sa.Column("committed_rows", sa.BigInteger(), nullable=False),
        sa.Column("removal_seq", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_index_info_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_index_info")),
    )
    op.create_table(
        "segments",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("video_id", sa.Integer(), nullable=False),
        sa.Column("start_s", sa.Float(), nullable=False),
        sa.Column("end_s", sa.Float(), nullable=False),
        sa.Column("removed", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.ForeignKeyConstraint(
            ["video_id"], ["videos.id"], name=op.f("fk_segments_video_id_videos")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_segments")),
    )
    op.create_index(op.f("ix_segments_video_id"), "segments", ["video_id"])
    op.create_table(
        "captions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("video_id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("split", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["video_id"], ["videos.id"], name=op.f("fk_captions_video_id_videos")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_captions")),
    )
    op.create_index(op.f("ix_captions_video_id"), "captions", ["video_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_captions_video_id"), table_name="captions")
    op.drop_table("captions")
    op.drop_index(op.f("ix_segments_video_id"), table_name="segments")
    op.drop_table("segments")
    op.drop_table("index_info")
    op.drop_table("videos")
