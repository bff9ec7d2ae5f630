"""Ad-hoc SQL from JupyterLab: an SQLAlchemy engine over $DATABASE_URL (read-only sessions by default) and
`read_sql(query, **params)` → DataFrame. Tables a user may query are listed in the README ("Ad-hoc SQL")."""

from __future__ import annotations

import os
from functools import lru_cache

import pandas as pd
import sqlalchemy as sa


def _sa_url(url: str) -> str:
    """`postgresql://…` → `postgresql+psycopg://…` (the psycopg 3 dialect this project ships)."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


@lru_cache(maxsize=8)
def engine(database_url: str | None = None, *, read_only: bool = True) -> sa.Engine:
    """An engine over `database_url` (default $DATABASE_URL); `read_only` makes every session read-only."""
    url = database_url or os.environ.get("DATABASE_URL")
    if not url:
        raise ValueError("database_url: not given and $DATABASE_URL is not set")
    options = "-c default_transaction_read_only=on" if read_only else ""
    return sa.create_engine(_sa_url(url), connect_args={"options": options} if options else {},
                            pool_pre_ping=True)


def read_sql(query: str, *, database_url: str | None = None, **params) -> pd.DataFrame:
    """Run `query` (named `:params`) and return the rows as a DataFrame, e.g.
    `read_sql("SELECT * FROM workloads WHERE namespace = :ns", ns="ml")`."""
    with engine(database_url).connect() as conn:
        return pd.read_sql(sa.text(query), conn, params=params)
