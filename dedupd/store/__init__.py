"""The hash dictionary: its face. Which backend a URL names is known here and only here;
callers open a store with open_store() and speak to it through base.Store."""

from __future__ import annotations

from dedupd.store.base import (
    ImageRecord,
    Match,
    QuarantineEntry,
    Store,
    StoreError,
    StoreMissing,
    StoreStats,
)

SQLITE, POSTGRESQL = "sqlite", "postgresql"
# URL prefix -> backend. A URL without "://" is the path of an SQLite file.
SCHEMES = {"sqlite://": SQLITE, "postgresql://": POSTGRESQL, "postgres://": POSTGRESQL}
URL_FORMS = "a path, sqlite:///PATH or postgresql://USER@HOST/DB"


def backend_of(url: str) -> str:
    """The backend a store URL names (SQLITE or POSTGRESQL); StoreError if none does."""
    if "://" not in url:
        return SQLITE
    for prefix, backend in SCHEMES.items():
        if url.startswith(prefix):
            return backend
    raise StoreError(f"unsupported store {url.split('://')[0]!r} (use {URL_FORMS})")


def sqlite_file(url: str) -> str | None:
    """The file of an SQLite store URL; None for a store that is not a local file."""
    if backend_of(url) != SQLITE:
        return None
    return url.removeprefix("sqlite://")


def open_store(url: str, *, create: bool = True) -> Store:
    """Open the backend named by url. create=False: an SQLite file must exist already
    (read-only commands never create one)."""
    path = sqlite_file(url)
    if path is not None:
        from dedupd.store.sqlite import SQLiteStore

        return SQLiteStore(path, create=create)
    try:
        from dedupd.store.postgres import PostgresStore
    except ImportError as exc:  # psycopg missing
        raise StoreError(f"PostgreSQL store needs psycopg 3: {exc}") from None
    return PostgresStore(url)


__all__ = ["POSTGRESQL", "SCHEMES", "SQLITE", "URL_FORMS", "ImageRecord", "Match",
           "QuarantineEntry", "Store", "StoreError", "StoreMissing", "StoreStats",
           "backend_of", "open_store",
           "sqlite_file"]
