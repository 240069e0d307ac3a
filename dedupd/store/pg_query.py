"""How the PostgreSQL store lays out an image row: hashes of 64 bits and more as a signed
BIGINT plus BIGINT[] of the higher words, the row mapper, and the near-duplicate query
by multi-index hashing (see postgres.py for the scheme)."""

from __future__ import annotations

import functools

from dedupd.hashing import Recipe
from dedupd.store.base import LIVE_STATUSES, ImageRecord, path_from_db
from dedupd.store.hamming import SUBSTRINGS, substring_probes

IMAGE_COLS = ("id", "scope", "path", "recipe", "hash", "hash_hi", "digest", "file_size",
              "mtime_ns", "width", "height", "first_seen", "status")
SELECT_IMAGE = ", ".join(IMAGE_COLS)
LIVE = ", ".join(f"'{s}'" for s in LIVE_STATUSES)
_WORD = (1 << 64) - 1


@functools.lru_cache(maxsize=64)
def hash_words(recipe: str) -> int:
    return Recipe.from_key(recipe).bits // 64


def signed(word: int) -> int:
    return word - (1 << 64) if word >= 1 << 63 else word


def split_hash(record_hash: int, words: int) -> tuple[int, list[int] | None]:
    """(low word as a signed BIGINT, higher words as BIGINT[] or None)."""
    parts = [signed((record_hash >> (64 * w)) & _WORD) for w in range(words)]
    return parts[0], parts[1:] or None


def joined_hash(low: int, high: list[int] | None) -> int:
    value = low & _WORD
    for w, word in enumerate(high or (), 1):
        value |= (word & _WORD) << (64 * w)
    return value


def record_from_row(row: tuple) -> ImageRecord:
    (rid, scope, path, recipe, low, high, digest, size, mtime, w, h, seen, status) = row[:13]
    return ImageRecord(scope, path_from_db(path), recipe, joined_hash(low, high), digest, size,
                       mtime, w, h, seen, status, rid)


def near_query(recipe: str, hash: int, max_distance: int, limit: int
               ) -> tuple[str, dict[str, object]]:
    """SQL and arguments (all but %(c)s, the collection) of the records within
    max_distance, nearest first, ties by id; the last column is the distance."""
    words = hash_words(recipe)
    args: dict[str, object] = {f"q{w}": signed((hash >> (64 * w)) & _WORD)
                               for w in range(words)}
    args.update(d=max_distance, limit=limit)
    probes = substring_probes(hash, max_distance) if words == 1 else None
    distance = _distance_sql(words)
    cols = ", ".join(f"i.{c}" for c in IMAGE_COLS)
    if probes is None:  # 256-bit or a radius past 3: scan the (scope, recipe), see above
        return (f"SELECT {cols}, c.dist FROM (SELECT id, {distance} AS dist FROM images "
                f"WHERE coll = %(c)s AND status IN ({LIVE})) c JOIN images i ON i.id = c.id "
                "WHERE c.dist <= %(d)s ORDER BY c.dist, c.id LIMIT %(limit)s"), args
    branches = []
    for j in range(SUBSTRINGS):
        args[f"p{j}"] = probes[j]
        branches.append(
            f"SELECT id, {distance} AS dist FROM images WHERE coll = %(c)s "
            f"AND status IN ({LIVE}) AND s{j} = ANY(%(p{j})s::integer[]) "
            f"AND {distance} <= %(d)s")
    return (f"SELECT {cols}, c.dist FROM ({' UNION '.join(branches)}) c "
            "JOIN images i ON i.id = c.id ORDER BY c.dist, c.id LIMIT %(limit)s"), args


def _distance_sql(words: int) -> str:
    terms = ["bit_count((hash # %(q0)s::bigint)::bit(64))"]
    terms += [f"bit_count((hash_hi[{w}] # %(q{w})s::bigint)::bit(64))" for w in range(1, words)]
    return " + ".join(terms)
