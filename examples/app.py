"""A complete example application: sign a user up and enqueue a welcome email.

The user's row and the job are written in one SQLAlchemy transaction, so the
job exists if and only if the sign-up commits. Run it from the repository root
after `dbtasks migrate`, then watch `dbtasks worker` run the job:

    python examples/app.py alice@example.com
    python examples/app.py --fail bob@example.com   # rolls back: no user, no job
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dbtasks  # noqa: E402
from tasks.email import send_welcome_email  # noqa: E402

app_metadata = MetaData()

users = Table(
    "users",
    app_metadata,
    Column("id", Integer, primary_key=True),
    Column("email", String(320), nullable=False, unique=True),
)


def sign_up(session: Session, email: str) -> int:
    """Add a user and enqueue their welcome email, in the caller's transaction."""
    user_id = session.execute(
        insert(users).values(email=email).returning(users.c.id)
    ).scalar_one()
    dbtasks.enqueue(
        session,
        send_welcome_email,
        {"user_id": user_id, "email": email},
        idempotency_key=f"welcome:{user_id}",
    )
    return user_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("email")
    parser.add_argument("--fail", action="store_true", help="fail after enqueueing")
    args = parser.parse_args()

    url = os.environ.get("DBTASKS_DATABASE_URL", "sqlite:///dbtasks.sqlite3")
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    app_metadata.create_all(engine)

    try:
        with Session(engine) as session, session.begin():
            user_id = sign_up(session, args.email)
            if args.fail:
                raise RuntimeError("sign-up failed after enqueueing: rolled back")
    except IntegrityError:
        sys.exit(f"{args.email} has signed up already: nothing added, no job")
    except RuntimeError as exc:
        sys.exit(f"{exc}; no user, no job")
    print(f"user {user_id} signed up; welcome email enqueued")


if __name__ == "__main__":
    main()
