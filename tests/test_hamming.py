"""Multi-index Hamming search against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from dedupd.store.hamming import HammingIndex


def brute(ids: np.ndarray, hashes: np.ndarray, q: int, d: int) -> list[tuple[int, int]]:
    dist = np.bitwise_count(hashes ^ np.uint64(q)).astype(int)
    hit = np.flatnonzero(dist <= d)
    return sorted(zip(ids[hit].tolist(), dist[hit].tolist(), strict=True),
                  key=lambda t: (t[1], t[0]))


def flip(h: int, rng: np.random.Generator, k: int) -> int:
    for b in rng.choice(64, k, replace=False):
        h ^= 1 << int(b)
    return h


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(42)
    n = 100_000
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    # Plant neighbours at 1..12 bits of some hashes so every radius has hits.
    for i in range(0, 2000, 2):
        hashes[i + 1] = np.uint64(flip(int(hashes[i]), rng, 1 + i % 12))
    ids = np.arange(1, n + 1, dtype=np.int64)
    index = HammingIndex(64)
    index.add_many(ids, hashes.reshape(-1, 1))
    return ids, hashes, index, rng


@pytest.mark.parametrize("d", [0, 1, 3, 4, 8, 10, 16])
def test_equals_brute_force_on_100k(data, d: int) -> None:
    ids, hashes, index, rng = data
    queries = [int(h) for h in hashes[:200:2]] + [flip(int(h), rng, 2) for h in hashes[:50]]
    queries += [int(x) for x in rng.integers(0, 2**64, 20, dtype=np.uint64)]
    for q in queries:
        assert index.query(q, d) == brute(ids, hashes, q, d)


def test_delta_removal_and_readd(data) -> None:
    ids, hashes, _, rng = data
    index = HammingIndex(64)
    index.add_many(ids[:50_000], hashes[:50_000].reshape(-1, 1))
    for i in range(50_000, 50_500):  # below the rebuild threshold: served from the delta
        index.add(int(ids[i]), int(hashes[i]))
    alive = np.zeros(len(ids), bool)
    alive[:50_500] = True
    for i in rng.choice(50_500, 300, replace=False):
        index.remove(int(ids[i]))
        alive[i] = False
    index.remove(10**9)  # unknown ids are ignored
    assert len(index) == int(alive.sum())
    for q in [int(h) for h in hashes[:400:3]] + [int(hashes[50_100])]:
        assert index.query(q, 8) == brute(ids[alive], hashes[alive], q, 8)
    index.add(int(ids[0]), 12345)  # re-adding an id replaces its hash
    assert index.query(12345, 0) == [(int(ids[0]), 0)]
    assert all(i != ids[0] for i, _ in index.query(int(hashes[0]), 0))
    index.add_many(ids[60_000:80_000], hashes[60_000:80_000].reshape(-1, 1))  # rebuild
    alive[60_000:80_000] = True
    alive[0] = False
    for q in [int(h) for h in hashes[60_000:60_300:7]]:
        assert index.query(q, 10) == brute(ids[alive], hashes[alive], q, 10)


def test_crowded_bucket_and_limit() -> None:
    index = HammingIndex(64)
    n = 20_000
    hashes = np.zeros(n, np.uint64)  # flat images all hash to 0
    hashes[n // 2:] = np.random.default_rng(1).integers(0, 2**64, n // 2, dtype=np.uint64)
    index.add_many(np.arange(n, dtype=np.int64), hashes.reshape(-1, 1))
    hits = index.query(0, 4)
    assert len(hits) >= n // 2 and hits[:3] == [(0, 0), (1, 0), (2, 0)]
    assert index.query(1, 4, limit=2) == [(0, 1), (1, 1)]


def test_256_bit() -> None:
    rng = np.random.default_rng(3)
    n = 5000
    words = rng.integers(0, 2**64, (n, 4), dtype=np.uint64)
    index = HammingIndex(256)
    index.add_many(np.arange(n, dtype=np.int64), words)
    q = sum(int(w) << (64 * i) for i, w in enumerate(words[17]))
    assert index.query(q, 0) == [(17, 0)]
    q2 = q ^ (1 << 200) ^ (1 << 3)
    assert index.query(q2, 2) == [(17, 2)]
    dist = np.bitwise_count(words ^ words[17]).sum(axis=1)
    assert len(index.query(q, 120)) == int((dist <= 120).sum())


def test_state_round_trip_skips_the_build(data) -> None:
    ids, hashes, _, rng = data
    index = HammingIndex(64)
    index.add_many(ids[:60_000], hashes[:60_000].reshape(-1, 1))  # built tables
    for i in range(60_000, 60_300):  # a delta not yet in the tables
        index.add(int(ids[i]), int(hashes[i]))
    for i in range(0, 3000, 7):  # tombstones
        index.remove(int(ids[i]))
    state = {k: v.copy() for k, v in index.state().items()}
    copy = HammingIndex.from_state(64, state)
    assert len(copy) == len(index) and copy._built == index._built > 0
    queries = [int(h) for h in hashes[:3000:5]] + [int(hashes[60_100]), flip(0, rng, 3)]
    for d in (0, 4, 10):
        for q in queries:
            assert copy.query(q, d) == index.query(q, d)
    copy.add(int(ids[0]), 777)  # and it stays a working index
    assert copy.query(777, 0) == [(int(ids[0]), 0)]
    bad = dict(state, tab_slot=state["tab_slot"][:-1])
    with pytest.raises(ValueError):
        HammingIndex.from_state(64, bad)
    with pytest.raises(ValueError):
        HammingIndex.from_state(64, dict(state, built=np.array(len(state["ids"]) + 1)))


def test_state_stays_exact_while_the_index_changes(data) -> None:
    # state() hands out views, not copies (a snapshot of 10M hashes is written from
    # them outside the lock): later adds, removes, a compacting rebuild and growth must
    # leave what it returned untouched.
    ids, hashes, _, rng = data
    index = HammingIndex(64)
    index.add_many(ids[:20_000], hashes[:20_000].reshape(-1, 1))
    for i in range(20_000, 20_100):  # the arrays grow: room for what follows
        index.add(int(ids[i]), int(hashes[i]))
    for i in range(0, 2000, 3):
        index.remove(int(ids[i]))
    state = index.state()
    frozen = {k: v.copy() for k, v in state.items()}
    capacity = len(index._ids)
    for i in range(2000, 12_000):  # tombstones enough to compact at the next rebuild
        index.remove(int(ids[i]))
    for i in range(20_100, 26_000):  # appends into the same arrays, then a rebuild
        index.add(int(ids[i]), int(hashes[i]))
    index.add(int(ids[15_000]), 12345)  # an id re-added with a new hash
    assert len(index._ids) == capacity  # no growth: the compaction had the old arrays
    assert index._built > 12_000 and index._n < 20_000  # rebuilt and compacted
    for i in range(26_000, 60_000):  # and growth after that
        index.add(int(ids[i]), int(hashes[i]))
    for key, value in frozen.items():
        assert np.array_equal(state[key], value), key
    copy = HammingIndex.from_state(64, state)
    assert copy.query(int(hashes[15_000]), 0) == [(int(ids[15_000]), 0)]
    assert copy.query(int(hashes[5000]), 0) == [(int(ids[5000]), 0)]


def test_adopt_equals_add_many(data) -> None:
    ids, hashes, _, rng = data
    bulk = HammingIndex(64)
    bulk.add_many(ids[:30_000], hashes[:30_000].reshape(-1, 1))
    adopted = HammingIndex(64)
    adopted.adopt(ids[:30_000].copy(), hashes[:30_000].copy())
    assert len(adopted) == len(bulk) == 30_000 and adopted._built == 30_000
    for q in [int(h) for h in hashes[:30_000:997]] + [flip(5, rng, 3)]:
        for d in (0, 4, 10):
            assert adopted.query(q, d) == bulk.query(q, d)
    twice, usual = HammingIndex(64), HammingIndex(64)  # repeated ids: not adoptable,
    twice.adopt(np.array([5, 6, 5]), np.array([1, 2, 3], np.uint64))  # added as usual
    usual.add_many(np.array([5, 6, 5]), np.array([[1], [2], [3]], np.uint64))
    assert twice._slot_of[5] == usual._slot_of[5] == 2
    assert [twice.query(h, 0) for h in (1, 2, 3)] == [usual.query(h, 0) for h in (1, 2, 3)]


def test_exact_queries_see_the_delta(data) -> None:
    # Hashes added since the last rebuild are found through the delta's own map, not a
    # scan: same answers as brute force for new, shared, removed and re-added entries.
    ids, hashes, _, _ = data
    index = HammingIndex(64)
    index.add_many(ids[:10_000], hashes[:10_000].reshape(-1, 1))
    live = {int(i): int(h) for i, h in zip(ids[:10_000], hashes[:10_000], strict=True)}
    assert index._built == 10_000
    news = [(int(ids[i]), int(hashes[i])) for i in range(10_000, 12_000)]
    news += [(int(ids[12_000]), live[int(ids[5])]), (int(ids[12_001]), int(hashes[10_500]))]
    for i, h in news:
        index.add(i, h)
        live[i] = h
    for i in (int(ids[10_007]), int(ids[3])):
        index.remove(i)
        del live[i]
    index.add(int(ids[10_009]), 4242)  # re-added with a new hash
    live[int(ids[10_009])] = 4242
    assert index._n > index._built  # still a delta
    for h in {*list(live.values())[::50], int(hashes[10_007]), int(hashes[3]),
              int(hashes[10_009]), 4242, live[int(ids[5])], int(hashes[10_500])}:
        want = sorted(i for i, v in live.items() if v == h)
        assert [i for i, _ in index.query(h, 0)] == want, h
