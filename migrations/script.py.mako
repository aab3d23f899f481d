"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    # If code of the previous release cannot run on the schema this leaves
    # (a dropped or renamed column, a new NOT NULL without a default), end
    # with: op.execute("UPDATE dbtasks_schema_info SET value = '<this revision>'
    # WHERE key = 'compatible_from'"). See dbtasks.schema.schema_info.
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
