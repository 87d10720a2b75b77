"""index_info.encode_dtype: the dtype(s) the model ran in to encode the index's segments.

Indexes built before it was recorded keep NULL (unknown); the next `pvl-search index` run
that encodes anything records its dtype.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("index_info") as batch:
        batch.add_column(sa.Column("encode_dtype", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("index_info") as batch:
        batch.drop_column("encode_dtype")
