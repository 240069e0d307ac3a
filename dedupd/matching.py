"""Which indexed images a hashed image duplicates: the dictionary's candidates within a
policy's distance, given the second look (signatures), and optionally as mirror images
and rotations. Read-only: the pipeline decides and acts on what this finds, and `check`
reports it."""

from __future__ import annotations

from dataclasses import replace

from dedupd.hashing import ImageHash, Recipe
from dedupd.signature import Signature, confirms, search_radius
from dedupd.store import ImageRecord, Match, Store

# Candidates within the threshold given a second look, nearest first: enough that a
# dictionary with many look-alikes (dark frames, blank pages) still finds the real copy.
CANDIDATES = 32


def lookup_radius(sig: Signature | None, max_distance: int) -> int:
    """How far to look up candidates: a little beyond the policy's threshold when the
    second look can confirm them (signature.search_radius), the threshold otherwise."""
    return search_radius(max_distance) if sig is not None else max_distance


def second_look(store: Store, sig: Signature | None, matches: list[Match],
                max_distance: int) -> list[Match]:
    """The candidates that are duplicates: byte-identical copies at once, the others only
    when their stored signature confirms the newcomer's. A record stored before
    signatures existed matches on its hash alone within max_distance, unless the
    newcomer's hash says little (low_information)."""
    near = [m.record.id for m in matches if not m.identical and m.record.id is not None]
    stored = store.signatures(near) if near and sig is not None else {}  # type: ignore[arg-type]
    kept = []
    for m in matches:
        if m.identical or sig is None:
            if m.identical or m.distance <= max_distance:
                kept.append(m)
            continue
        other = Signature.from_bytes(stored.get(m.record.id, b""))  # type: ignore[arg-type]
        if (confirms(sig, other, max_distance, m.distance) if other is not None
                else m.distance <= max_distance and not sig.low_information):
            kept.append(m)
    return kept


def as_flipped(store: Store, scope: str, hashed: ImageHash, max_distance: int,
               exclude: str | None = None) -> list[Match]:
    """The records `hashed` duplicates as one of its 7 mirror images and rotations, for
    the first that has any (Match.transform names how the newcomer differs)."""
    radius = lookup_radius(hashed.signature, max_distance)
    for transform, value, sign in hashed.variants():
        found = [m for m in store.find_matches(scope, hashed.recipe.key, value, None, radius,
                                               limit=CANDIDATES)
                 if m.record.path != exclude]
        found = second_look(store, sign(), found, max_distance) if found else []
        if found:
            return [replace(m, transform=transform) for m in found]
    return []


def find_duplicates(store: Store, scope: str, hashed: ImageHash, max_distance: int, *,
                    flips: bool = False, exclude: str | None = None, limit: int = 8
                    ) -> list[Match]:
    """The records `hashed` duplicates, nearest first: candidates within max_distance
    given the second look; with `flips`, when the image itself matches nothing, also as
    its mirror images and rotations."""
    found = [m for m in store.find_matches(scope, hashed.recipe.key, hashed.hash, hashed.digest,
                                           lookup_radius(hashed.signature, max_distance),
                                           limit=CANDIDATES)
             if m.record.path != exclude]
    found = second_look(store, hashed.signature, found, max_distance)
    if flips and not found:
        found = as_flipped(store, scope, hashed, max_distance, exclude)
    return found[:limit]


def duplicates_of_record(store: Store, record: ImageRecord, max_distance: int,
                         limit: int = 8) -> list[Match]:
    """The records a stored record duplicates, as the pipeline found them when it decided
    it: find_duplicates on its stored hash and signature, so a copy the second look
    confirmed beyond max_distance is found too (a pending duplicate's kept copy). Not as
    a mirror image or rotation: that needs the decoded image."""
    stored = store.signatures([record.id]) if record.id is not None else {}
    hashed = ImageHash(record.hash, Recipe.from_key(record.recipe), record.width,
                       record.height, record.digest, record.file_size, "",
                       signature=Signature.from_bytes(stored.get(record.id, b"")))  # type: ignore[arg-type]
    return find_duplicates(store, record.scope, hashed, max_distance, exclude=record.path,
                           limit=limit)
