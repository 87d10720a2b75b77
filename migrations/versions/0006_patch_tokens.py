"""index_info.patch_tokens / patch_dim: the shape of the patch tokens an index keeps per segment
for the patch reranker (issue #22). NULL: it keeps none, as every index before this.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("index_info") as batch:
        batch.add_column(sa.Column("patch_tokens", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("patch_dim", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("index_info") as batch:
        batch.drop_column("patch_dim")
        batch.drop_column("patch_tokens")
