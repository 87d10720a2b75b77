"""index_info.vector_store: where the index's vectors live (issue #16).

NULL is the FAISS file in the index folder, as before; ``milvus:URI[#INDEX_TYPE]`` a Milvus
collection (indexer/store/vectors/choice.py). Existing indexes keep NULL.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("index_info") as batch:
        batch.add_column(sa.Column("vector_store", sa.String(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("index_info") as batch:
        batch.drop_column("vector_store")
