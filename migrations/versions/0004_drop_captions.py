"""Drop the captions table: created by the first schema for evaluation, never used (captions
files are read by `pvl-search eval` directly).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index(op.f("ix_captions_video_id"), table_name="captions")
    op.drop_table("captions")


def downgrade() -> None:
    op.create_table(
        "captions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("video_id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("split", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(["video_id"], ["videos.id"], name=op.f("fk_captions_video_id_videos")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_captions")),
    )
    op.create_index(op.f("ix_captions_video_id"), "captions", ["video_id"])
