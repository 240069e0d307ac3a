"""In-memory near-duplicate search over fixed-width hashes: multi-index hashing.

Norouzi et al.'s pigeonhole argument: split a 64-bit hash into m = 4 substrings of 16
bits; two hashes within distance d agree to within floor(d/m) bits on at least one
substring. So a query probes, in each of the 4 tables, the buckets of every 16-bit value
within that radius of its own substring (1, 17, 137 or 697 values for radius 0..3) and
checks the candidates with one vectorised XOR + popcount. Tables are CSR arrays (a
sorted permutation plus 65,537 bucket offsets), built in bulk with numpy, so 10M hashes
take ~0.4 GB and load in a second or two. New hashes go to a small delta (at most 1/64
of the index) until the next rebuild: near-duplicate queries scan it flat, exact ones
look it up in a hash map. Removals are tombstones. When the probed buckets would hold too
many candidates (large d, or crowded buckets: real dHash values cluster, flat images
hash to 0) a flat vectorised scan is cheaper and is used instead. 256-bit hashes always
use the flat scan.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SUBSTRINGS = 4
SUB_BITS = 16
_BUCKETS = 1 << SUB_BITS
_MAX_RADIUS = 3


def _masks_within(radius: int) -> np.ndarray:
    """All 16-bit values with at most `radius` bits set."""
    values = np.arange(_BUCKETS, dtype=np.uint32)
    return values[np.bitwise_count(values) <= radius]


_MASKS = [_masks_within(r) for r in range(_MAX_RADIUS + 1)]


def substrings(hash: int) -> list[int]:
    """The four 16-bit substrings of a 64-bit hash, low bits first."""
    return [(hash >> (SUB_BITS * j)) & (_BUCKETS - 1) for j in range(SUBSTRINGS)]


def substring_probes(hash: int, max_distance: int) -> list[list[int]] | None:
    """Per 16-bit substring of a 64-bit hash, the bucket values a query within
    max_distance must probe (pigeonhole: within floor(d/4) bits of the query's own);
    None when the radius is too large for probing to beat a scan. The PostgreSQL store
    probes its btree indexes with these; HammingIndex._probe does the same in numpy."""
    radius = max_distance // SUBSTRINGS
    if radius > _MAX_RADIUS:
        return None
    return [(_MASKS[radius] ^ sub).tolist() for sub in substrings(hash)]


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The concatenation of arange(lo[i], hi[i]) for all i, without a Python loop."""
    lens = hi - lo
    keep = lens > 0
    lo, lens = lo[keep], lens[keep]
    if lens.size == 0:
        return np.empty(0, np.int64)
    if lens.size == 1:
        return np.arange(lo[0], lo[0] + lens[0])
    offsets = np.cumsum(lens) - lens
    return np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(offsets - lo, lens)


_CHUNK = 1 << 20


def _take(source: np.ndarray, indices: np.ndarray, out: np.ndarray) -> None:
    """np.take(source, indices, out=out) a million at a time: numpy widens int32 indices
    to a temporary int64 copy, 80 MB per table at 10M hashes."""
    for start in range(0, len(indices), _CHUNK):
        end = start + _CHUNK
        np.take(source, indices[start:end], out=out[start:end])


class HammingIndex:
    """Near-duplicate lookup over `bits`-wide hashes, keyed by integer record ids.

    Ids are expected to be dense-ish (database row ids): an id -> slot array is kept.

    Over ~200 lines on purpose: the CSR tables, the delta, the tombstones and the id ->
    slot array share one lock and one slot numbering; apart, each would reach into the
    others' internals on every add, remove and rebuild.
    """

    def __init__(self, bits: int = 64) -> None:
        if bits % 64:
            raise ValueError("bits must be a multiple of 64")
        self.bits, self.words = bits, bits // 64
        self._lock = threading.Lock()
        self._n = 0  # slots used
        self._live = 0
        self._hashes = np.empty((1024, self.words), np.uint64)
        self._ids = np.empty(1024, np.int64)
        self._alive = np.zeros(1024, bool)
        self._slot_of = np.full(1024, -1, np.int64)  # id -> slot
        self._built = 0  # slots [0, _built) are in the MIH tables
        # The 4 tables side by side: bucket b of table j is [_starts[j*65536+b],
        # _starts[j*65536+b+1]) in _tab_slot (slots) and _tab_hash (their hashes, copied
        # in bucket order so candidate checks read memory sequentially).
        self._tab_slot = np.empty(0, np.int32)
        self._tab_hash = np.empty(0, np.uint64)
        self._starts = np.zeros(1, np.int64)
        # Exact lookups in the delta [_built, _n) (64-bit hashes): hash -> its slots. At
        # 10M hashes the delta grows to 156k before a rebuild, and scanning it flat would
        # cost an exact query 60 us or more; this costs ~150 bytes per delta entry.
        self._delta: dict[int, list[int]] = {}

    def _note_delta(self, start: int, end: int) -> None:
        if self.words == 1:
            for slot, value in enumerate(self._hashes[start:end, 0].tolist(), start):
                self._delta.setdefault(value, []).append(slot)

    def __len__(self) -> int:
        return self._live

    @property
    def nbytes(self) -> int:
        arrays = [self._hashes, self._ids, self._alive, self._slot_of, self._tab_slot,
                  self._tab_hash, self._starts]
        return sum(a.nbytes for a in arrays)

    # -------------------------------------------------------------- writes

    def _reserve(self, slots: int, max_id: int) -> None:
        if slots > len(self._ids):
            cap = max(slots, 2 * len(self._ids))
            for name in ("_hashes", "_ids", "_alive"):
                old = getattr(self, name)
                new = np.zeros((cap, *old.shape[1:]), old.dtype)
                new[: self._n] = old[: self._n]
                setattr(self, name, new)
        if max_id >= len(self._slot_of):
            cap = max(max_id + 1, 2 * len(self._slot_of))
            new = np.full(cap, -1, np.int64)
            new[: len(self._slot_of)] = self._slot_of
            self._slot_of = new

    def add(self, id: int, hash: int) -> None:
        """add_many for one hash, in scalar steps: the daemon adds one image at a time,
        and the bulk path's dozen array operations cost more than the work."""
        if id < 0:
            raise ValueError("ids must be non-negative")
        with self._lock:
            n = self._n
            self._reserve(n + 1, id)
            old = int(self._slot_of[id])
            if old >= 0 and self._alive[old]:  # re-adding an id replaces its hash
                self._alive[old] = False
                self._live -= 1
            for w in range(self.words):
                self._hashes[n, w] = (hash >> (64 * w)) & 0xFFFF_FFFF_FFFF_FFFF
            self._ids[n] = id
            self._alive[n] = True
            self._slot_of[id] = n
            self._n = n + 1
            self._live += 1
            if self._n - self._built > max(4096, self._built // 64):
                self._rebuild()
            else:
                self._note_delta(n, n + 1)

    def add_many(self, ids: np.ndarray, hashes: np.ndarray) -> None:
        """Bulk add: ids int64 (N,), hashes uint64 (N, words), word 0 = low 64 bits."""
        ids = np.asarray(ids, np.int64)
        hashes = np.asarray(hashes, np.uint64).reshape(len(ids), self.words)
        if len(ids) == 0:
            return
        if ids.min() < 0:
            raise ValueError("ids must be non-negative")
        with self._lock:
            self._reserve(self._n + len(ids), int(ids.max()))
            old = self._slot_of[ids]
            replaced = old[old >= 0]
            if replaced.size:  # re-adding an id replaces its hash
                self._alive[replaced] = False
                self._live -= int(replaced.size)
            first, end = self._n, self._n + len(ids)
            self._hashes[first:end] = hashes
            self._ids[first:end] = ids
            self._alive[first:end] = True
            self._slot_of[ids] = np.arange(first, end)
            self._n = end
            self._live += len(ids)
            if self._n - self._built > max(4096, self._built // 64):
                self._rebuild()
            else:
                self._note_delta(first, end)

    def adopt(self, ids: np.ndarray, hashes: np.ndarray) -> None:
        """add_many into an empty index that takes the arrays as its own storage: the
        caller gives them up. A 10M-row load then holds one copy of them, not two, while
        the tables are built (they are never written in place: see state())."""
        ids = np.ascontiguousarray(ids, np.int64)
        hashes = np.ascontiguousarray(hashes, np.uint64).reshape(len(ids), self.words)
        n = len(ids)
        with self._lock:
            adopt = self._n == 0 and n > 0 and ids.min() >= 0
            if adopt:
                slot_of = np.full(max(int(ids.max()) + 1, 1024), -1, np.int64)
                slot_of[ids] = np.arange(n)
                adopt = bool((slot_of[ids] == np.arange(n)).all())  # ids are unique
            if adopt:
                self._ids, self._hashes, self._slot_of = ids, hashes, slot_of
                self._alive = np.ones(n, bool)
                self._n = self._live = n
                self._rebuild()
        if not adopt:
            self.add_many(ids, hashes)

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that recreate this index exactly, tables included (for a snapshot):
        loading them skips the sort that building 10M entries costs.

        Only `alive` is copied. Slots below `_n` never change once written (appends go
        above, growth and compaction make new arrays) and the tables are replaced, not
        edited, so views stay exact while the caller writes them out: at 10M hashes a
        snapshot costs 10 MB of extra memory instead of 700."""
        with self._lock:
            n = self._n
            return {"ids": self._ids[:n], "hashes": self._hashes[:n],
                    "alive": self._alive[:n].copy(), "tab_slot": self._tab_slot,
                    "starts": self._starts, "built": np.array(self._built, np.int64)}

    @classmethod
    def from_state(cls, bits: int, state: dict[str, np.ndarray]) -> HammingIndex:
        """The index `state()` described; ValueError if the arrays do not fit together."""
        index = cls(bits)
        ids = np.asarray(state["ids"], np.int64)
        hashes = np.asarray(state["hashes"], np.uint64)
        alive = np.asarray(state["alive"], bool)
        tab_slot = np.asarray(state["tab_slot"], np.int32)
        starts = np.asarray(state["starts"], np.int64)
        n, built = len(ids), int(state["built"])
        tables = SUBSTRINGS if index.words == 1 and built else 0
        if (hashes.shape != (n, index.words) or alive.shape != (n,) or not 0 <= built <= n
                or tab_slot.shape != (tables * built,)
                or starts.shape != ((tables * _BUCKETS + 1) if tables else 1,)
                or (n and ids.min() < 0)
                or (tables and (starts[-1] != tables * built or tab_slot.max() >= built))):
            raise ValueError("index arrays do not fit together")
        index._ids, index._hashes, index._alive = ids, hashes, alive
        index._n, index._built, index._live = n, built, int(alive.sum())
        if built:
            index._note_delta(built, n)
        index._slot_of = np.full(max(int(ids.max()) + 1 if n else 0, 1024), -1, np.int64)
        for start in range(0, n, _CHUNK):  # in slices: no 10M-long temporaries
            live = np.flatnonzero(alive[start:start + _CHUNK]) + start
            index._slot_of[ids[live]] = live
        index._tab_slot, index._starts = tab_slot, starts
        index._tab_hash = np.empty(len(tab_slot), np.uint64)
        if tables:
            low = hashes[:, 0]

            def gather(j: int) -> None:  # numpy gathers outside the GIL
                part = slice(j * built, (j + 1) * built)
                _take(low, tab_slot[part], index._tab_hash[part])

            with ThreadPoolExecutor(min(SUBSTRINGS, os.cpu_count() or 1)) as pool:
                list(pool.map(gather, range(SUBSTRINGS)))
        return index

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, hashes) of the live entries, e.g. for a snapshot."""
        with self._lock:
            live = np.flatnonzero(self._alive[: self._n])
            return self._ids[live].copy(), self._hashes[live].copy()

    def has(self, id: int, hash: int) -> bool:
        """Is `id` live here with exactly this (64-bit) hash? A replica's tail skips rows
        its own host already added, instead of re-adding them (a tombstone each)."""
        with self._lock:
            if not 0 <= id < len(self._slot_of) or self._slot_of[id] < 0:
                return False
            slot = int(self._slot_of[id])
            return bool(self._alive[slot]) and int(self._hashes[slot, 0]) == hash

    def remove(self, id: int) -> None:
        with self._lock:
            if 0 <= id < len(self._slot_of) and self._slot_of[id] >= 0:
                self._alive[self._slot_of[id]] = False
                self._slot_of[id] = -1
                self._live -= 1

    def _rebuild(self) -> None:
        """Compact tombstones and rebuild the substring tables over every slot."""
        n = self._n
        # The old tables go first: queries wait for the lock anyway, and a 10M index
        # would otherwise hold two sets of tables (480 MB each) at once.
        self._built = 0
        self._tab_slot = np.empty(0, np.int32)
        self._tab_hash = np.empty(0, np.uint64)
        self._starts = np.zeros(1, np.int64)
        self._delta = {}  # everything is in the tables once this returns
        if self._live < n:
            # Compacted into new arrays, never in place: a snapshot being written holds
            # views of the old ones (see state()).
            keep = np.flatnonzero(self._alive[:n])
            cap = len(self._ids)
            for name in ("_hashes", "_ids"):
                old = getattr(self, name)
                new = np.zeros((cap, *old.shape[1:]), old.dtype)
                new[: len(keep)] = old[keep]
                setattr(self, name, new)
            self._alive = np.zeros(cap, bool)
            self._alive[: len(keep)] = True
            n = self._n = len(keep)
            self._slot_of[:] = -1
            self._slot_of[self._ids[:n]] = np.arange(n)
        if self.words == 1 and n:
            low = self._hashes[:n, 0]
            # Substring j of every hash, as a strided uint16 view (little-endian words).
            subs = low.view(np.uint16).reshape(n, SUBSTRINGS)
            slots = np.empty(SUBSTRINGS * n, np.int32)
            counts = np.empty(SUBSTRINGS * _BUCKETS, np.int64)
            tab_hash = np.empty(SUBSTRINGS * n, np.uint64)

            def build(j: int) -> None:  # numpy sorts and gathers outside the GIL
                keys = np.ascontiguousarray(subs[:, j])
                part = slots[j * n:(j + 1) * n]
                part[:] = np.argsort(keys, kind="stable")
                counts[j * _BUCKETS:(j + 1) * _BUCKETS] = np.bincount(keys, minlength=_BUCKETS)
                _take(low, part, tab_hash[j * n:(j + 1) * n])

            with ThreadPoolExecutor(min(SUBSTRINGS, os.cpu_count() or 1)) as pool:
                list(pool.map(build, range(SUBSTRINGS)))
            self._starts = np.zeros(SUBSTRINGS * _BUCKETS + 1, np.int64)
            np.cumsum(counts, out=self._starts[1:])
            self._tab_slot, self._tab_hash = slots, tab_hash
        self._built = n

    # -------------------------------------------------------------- queries

    def _probe(self, hash: int, max_distance: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(slots, distances) of hits among the tables, or None when a flat scan is cheaper."""
        if self.words != 1 or self._built == 0:
            return None
        keys = [sub + j * _BUCKETS for j, sub in enumerate(substrings(hash))]
        q = np.uint64(hash)
        radius = max_distance // SUBSTRINGS
        if radius > _MAX_RADIUS:
            return None
        buckets = (_MASKS[radius][None, :] ^ np.array(keys, np.uint32)[:, None]).ravel()
        lo, hi = self._starts[buckets], self._starts[buckets + 1]
        if int((hi - lo).sum()) > self._built // 3:  # crowded: a flat scan is cheaper
            return None
        where = _ranges(lo, hi)
        dist = np.bitwise_count(self._tab_hash[where] ^ q)
        ok = np.flatnonzero(dist <= max_distance)
        slots, first = np.unique(self._tab_slot[where[ok]], return_index=True)
        return slots, dist[ok][first].astype(np.int32)

    def _exact_slots(self, hash: int) -> np.ndarray:
        """Slots holding exactly `hash` (64-bit): the smallest of its four buckets plus
        the delta's. The common query (has this image been seen?), so kept lean."""
        q = np.uint64(hash)
        n, built = self._n, self._built
        if built == 0:
            return np.flatnonzero(self._hashes[:n, 0] == q)
        keys = [sub + j * _BUCKETS for j, sub in enumerate(substrings(hash))]
        bounds = self._starts[[k + e for k in keys for e in (0, 1)]].tolist()
        lo, hi = min(zip(bounds[::2], bounds[1::2], strict=True), key=lambda b: b[1] - b[0])
        slots = self._tab_slot[lo + np.flatnonzero(self._tab_hash[lo:hi] == q)]
        extra = self._delta.get(hash) if n > built else None
        if extra:
            slots = np.concatenate((slots, np.array(extra, np.int64)))
        return slots

    def _distances(self, slots: np.ndarray | slice, hash: int) -> np.ndarray:
        words = self._hashes[slots]
        dist = np.zeros(len(words), np.int32)
        for w in range(self.words):
            q = np.uint64((hash >> (64 * w)) & 0xFFFF_FFFF_FFFF_FFFF)
            dist += np.bitwise_count(words[:, w] ^ q)
        return dist

    def query(self, hash: int, max_distance: int, limit: int | None = None
              ) -> list[tuple[int, int]]:
        """(id, distance) of every live hash within max_distance, nearest first, ties by id."""
        with self._lock:
            n, built = self._n, self._built
            if n == 0:
                return []
            if max_distance == 0 and self.words == 1:
                slots = self._exact_slots(hash)
                ids = np.sort(self._ids[slots[self._alive[slots]]])
                return [(i, 0) for i in ids[:limit].tolist()]
            found_slots, found_dist = [], []
            probed = self._probe(hash, max_distance)
            if probed is None:
                dist = self._distances(slice(0, n), hash)
                hit = np.flatnonzero((dist <= max_distance) & self._alive[:n])
                found_slots.append(hit)
                found_dist.append(dist[hit])
            else:
                hit, hd = probed
                ok = self._alive[hit]
                found_slots.append(hit[ok])
                found_dist.append(hd[ok])
                if n > built:  # the delta since the last rebuild
                    dist = self._distances(slice(built, n), hash)
                    hit = np.flatnonzero((dist <= max_distance) & self._alive[built:n])
                    found_slots.append(hit + built)
                    found_dist.append(dist[hit])
            slots = np.concatenate(found_slots)
            if slots.size == 0:
                return []
            dists = np.concatenate(found_dist)
            ids = self._ids[slots]
        order = np.lexsort((ids, dists))
        if limit is not None:
            order = order[:limit]
        return list(zip(ids[order].tolist(), dists[order].tolist(), strict=True))
