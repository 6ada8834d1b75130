"""data protection: personal fields encrypted at rest, the ID number's blind index

The personal fields of ``results`` hold sealed tokens (``enc1:<kid>:…``), longer than the
values they seal: the short columns become TEXT. ``checks`` and ``raw`` stay JSON (a sealed value
is stored as a JSON string). ``id_number_index`` holds the ID number's blind index.

Rows written before this revision stay readable as they are (a value that is not a token is
returned unchanged); ``idocr keys rotate`` seals them and fills in their blind index.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 00:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

# column: its length before this revision
_WIDENED = {
    'gender': 8,
    'ethnicity': 32,
    'date_of_birth': 10,
    'id_number': 32,
    'valid_from': 10,
    'valid_to': 10,
}


def upgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        for column, length in _WIDENED.items():
            batch_op.alter_column(
                column,
                existing_type=sa.String(length=length),
                type_=sa.Text(),
                existing_nullable=True,
            )
        batch_op.add_column(sa.Column('id_number_index', sa.String(length=100), nullable=True))
        batch_op.create_index(
            batch_op.f('ix_results_id_number_index'), ['id_number_index'], unique=False
        )


def downgrade() -> None:
    # Sealed values do not fit the old lengths: PostgreSQL refuses the downgrade while the
    # table holds any (open them with an export first).
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_results_id_number_index'))
        batch_op.drop_column('id_number_index')
        for column, length in _WIDENED.items():
            batch_op.alter_column(
                column,
                existing_type=sa.Text(),
                type_=sa.String(length=length),
                existing_nullable=True,
            )
