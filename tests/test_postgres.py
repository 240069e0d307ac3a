"""The PostgreSQL store against a real server: schema migration, in-database multi-index
hashing, advisory locks across processes, SQLite <-> PostgreSQL copies, two daemons racing
on one dictionary, and a daemon riding out a database restart (on a private cluster).

The store contract shared with SQLite is in test_store.py (parametrized over both).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from conftest import fresh_database, pg_admin_url, photo
from daemonproc import DaemonProcess, files_under, wait_for, write_config
from test_daemon import distinct_seeds, encode
from test_service import NotifySocket
from test_store import RECIPE, rec

from dedupd.cli import main
from dedupd.store import QuarantineEntry, StoreError, open_store
from dedupd.store.base import ALLOWED, DONE, QUARANTINED, Lookup
from dedupd.store.postgres import SCHEMA_VERSION, PostgresStore, near_query, redact

ROOT = Path(__file__).resolve().parent.parent
WIDE = "dhash:16:fast:area:v1"  # 256-bit hashes: the documented scan fallback


def sql(url: str, query: str, args: tuple | dict = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, args)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


# ---------------------------------------------------------------- schema


def test_schema_is_created_migrated_and_versioned(pg_url: str, tmp_path: Path, capsys) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"index": pg_url})
    assert main(["--config", str(cfg), "db", "migrate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["from_version"], out["to_version"]) == (0, SCHEMA_VERSION)
    assert "password" not in out["store"]
    assert main(["--config", str(cfg), "db", "migrate"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert sql(pg_url, "SELECT version FROM dedupd_schema") == [(SCHEMA_VERSION,)]
    # Hosts starting at once take turns on the migration lock: all succeed, once.
    url2, drop = fresh_database(pg_admin_url()[0])  # type: ignore[arg-type]
    try:
        stores: list[PostgresStore] = []
        threads = [threading.Thread(target=lambda: stores.append(PostgresStore(url2)))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(stores) == 4
        assert sorted(s.migrated[0] for s in stores) == [0, SCHEMA_VERSION, SCHEMA_VERSION,
                                                         SCHEMA_VERSION]
        for s in stores:
            s.close()
    finally:
        drop()
    sql(pg_url, "UPDATE dedupd_schema SET version = 999")
    with pytest.raises(StoreError, match="newer"):
        open_store(pg_url)


def test_unreachable_server_is_one_clear_error(tmp_path: Path, capsys) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://dedupd:secret@127.0.0.1:{port}/x"
    started = time.monotonic()
    with pytest.raises(StoreError, match="refused") as err:
        open_store(url)
    assert time.monotonic() - started < 10
    assert "secret" not in str(err.value)
    cfg = write_config(tmp_path / "c.yaml", {"index": url})
    assert main(["--config", str(cfg), "stats"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "secret" not in lines[0] and "refused" in lines[0]
    assert redact("postgresql://u:pw@h/db?sslmode=verify-full") == \
        "postgresql://u:***@h/db?sslmode=verify-full"


# ---------------------------------------------------------------- queries


def test_near_duplicate_queries_probe_the_substring_indexes(pg_url: str) -> None:
    """Sub-linear: d <= 15 probes the four substring indexes, never a scan of the table."""
    store = PostgresStore(pg_url)
    rnd = random.Random(3)
    values = [rnd.getrandbits(64) for _ in range(100_000)]
    for i in range(0, len(values), 20_000):
        store.insert_many([rec(f"/{i + k}", v) for k, v in enumerate(values[i:i + 20_000])])
    sql(pg_url, "VACUUM ANALYZE images")
    (coll,) = sql(pg_url, "SELECT id FROM collections")[0]
    for d in (0, 4, 8, 10, 15):
        query, args = near_query(RECIPE, values[7] ^ 0b101, d, 10)
        plan = json.dumps(sql(pg_url, "EXPLAIN (FORMAT JSON) " + query, {**args, "c": coll}))
        assert "Seq Scan" not in plan, (d, plan)
        assert all(f"images_mih{j}" in plan for j in range(4)), (d, plan)
        got = store.find_matches("s", RECIPE, values[7] ^ 0b101, None, d)
        assert [m.record.path for m in got][:1] == (["/7"] if d >= 2 else [])
    store.close()


def test_wide_hashes_and_large_radii_fall_back_to_an_exact_scan(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    rnd = random.Random(11)
    wide = [rnd.getrandbits(256) for _ in range(500)]
    wide += [v ^ (1 << rnd.randrange(256)) ^ (1 << 200) for v in wide[:50]]
    store.insert_many([rec(f"/w{i}", v).with_(recipe=WIDE) for i, v in enumerate(wide)])
    narrow = [rnd.getrandbits(64) for _ in range(500)]
    store.insert_many([rec(f"/n{i}", v) for i, v in enumerate(narrow)])
    for q in wide[:10]:
        for d in (0, 3, 40):
            want = sorted(((v ^ q).bit_count(), i) for i, v in enumerate(wide)
                          if (v ^ q).bit_count() <= d)[:10]
            got = [(m.distance, int(m.record.path[2:]))
                   for m in store.find_matches("s", WIDE, q, None, d)]
            assert got == want
    assert store.get_by_path("/w3").hash == wide[3]  # all 256 bits survive the round trip
    for q in narrow[:5]:  # d = 20: radius 5, past the probes
        want = sorted(((v ^ q).bit_count(), i) for i, v in enumerate(narrow)
                      if (v ^ q).bit_count() <= 20)[:10]
        assert [(m.distance, int(m.record.path[2:]))
                for m in store.find_matches("s", RECIPE, q, None, 20)] == want
    store.close()


# ---------------------------------------------------------------- locking


def test_group_lock_is_held_across_processes(pg_url: str, tmp_path: Path) -> None:
    held, release, released = tmp_path / "held", tmp_path / "release", tmp_path / "released"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from dedupd.store import open_store
        s = open_store({pg_url!r})
        with s.locked("cats"):
            Path({str(held)!r}).write_text("1")
            while not Path({str(release)!r}).exists():
                time.sleep(0.01)
            Path({str(released)!r}).write_text("1")
        s.close()
    """)
    holder = subprocess.Popen([sys.executable, "-c", script],
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    store = open_store(pg_url)
    try:
        wait_for(lambda: held.exists() or holder.poll() is not None, 30, "the other process")
        assert holder.poll() is None
        dogs: list[bool] = []

        def other_group() -> None:
            with store.locked("dogs"):
                dogs.append(True)

        other = threading.Thread(target=other_group)
        other.start()
        other.join(10)
        assert dogs == [True], "another group's lock must not wait"
        seen_release: list[bool] = []

        def contender() -> None:
            with store.locked("cats"):
                seen_release.append(released.exists())

        t = threading.Thread(target=contender)
        t.start()
        wait_for(lambda: sql(pg_url, "SELECT count(*) FROM pg_locks WHERE locktype = "
                             "'advisory' AND NOT granted")[0][0] == 1, 10,
                 "the contender to wait on the advisory lock")
        assert seen_release == []
        release.write_text("1")
        t.join(30)
        assert seen_release == [True]  # granted only after the holder let go
    finally:
        release.write_text("1")
        holder.wait(30)
        store.close()


# ---------------------------------------------------------------- import / export


def test_export_import_roundtrip_is_idempotent(pg_url: str, tmp_path: Path, capsys) -> None:
    sqlite_path = tmp_path / "src.sqlite"
    src = open_store(str(sqlite_path))
    ids = src.insert_many([rec(f"/data/{i}.jpg", random.Random(i).getrandbits(64))
                           for i in range(12_000)])
    recs = [src.get(i) for i in ids[:2]]
    src.insert(rec("/data/wide.jpg", (1 << 255) | 12345).with_(recipe=WIDE))
    src.update(recs[1].with_(status=ALLOWED))
    moved = src.insert(rec("/q/data/dup.jpg", 77, status=QUARANTINED))
    src.add_quarantine(QuarantineEntry("/data/dup.jpg", "/q/data/dup.jpg", "/data/0.jpg", 1,
                                       "4d", "default", image_id=moved.id, state=DONE))
    src.add_quarantine(QuarantineEntry("/data/x.jpg", "/q/data/x.jpg", "/data/0.jpg", 2,
                                       "4e", "default", state="rolled_back"))
    src.close()
    cfg = write_config(tmp_path / "c.yaml", {"index": str(sqlite_path)})
    assert main(["--config", str(cfg), "db", "export", pg_url, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["images"], first["images_skipped"], first["quarantine"]) == (12_002, 0, 2)
    assert main(["--config", str(cfg), "db", "export", pg_url, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)  # re-run: nothing twice
    assert (again["images"], again["images_skipped"], again["quarantine"],
            again["quarantine_skipped"]) == (0, 12_002, 0, 2)
    back = tmp_path / "back.sqlite"
    cfg2 = write_config(tmp_path / "c2.yaml", {"index": str(back)})
    assert main(["--config", str(cfg2), "db", "import", pg_url]) == 0
    assert "12002 images copied" in capsys.readouterr().out

    def content(url: str) -> tuple[list, list]:
        s = open_store(url)
        try:
            by_id = {r.id: r.path for r in s.iter_records()}
            images = sorted((r.scope, r.path, r.recipe, r.hash, r.digest, r.file_size,
                             r.mtime_ns, r.width, r.height, r.first_seen, r.status)
                            for r in s.iter_records())
            journal = [(e.original_path, e.quarantine_path, e.matched_path, e.distance,
                        e.hash, e.policy, by_id.get(e.image_id), e.reason, e.created, e.state)
                       for e in s.list_quarantine()]
            return images, journal
        finally:
            s.close()

    original = content(str(sqlite_path))
    assert content(pg_url) == original
    assert content(str(back)) == original
    assert original[1][0][6] == "/q/data/dup.jpg"  # the journal still points at its record
    # Bad destinations: exit 2 and one line.
    assert main(["--config", str(cfg), "db", "export", "mysql://x/y"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["--config", str(cfg), "db", "export", str(sqlite_path)]) == 2
    assert "same store" in capsys.readouterr().err


# ---------------------------------------------------------------- daemons


def daemon_config(path: Path, url: str, root: Path, quarantine: Path, **extra) -> Path:
    body = {"index": url, "quarantine_dir": str(quarantine), "settle_seconds": 0.5,
            "workers": 2, "watches": [{"path": str(root), "group": "shared"}],
            "policies": {"default": {"max_distance": 6}},
            # Half or more of these drops are duplicates by design: no breaker trips.
            "circuit_breaker": {"threshold": 1.0}}
    body.update(extra)
    return write_config(path, body)


def statuses(url: str) -> dict[str, str]:
    return dict(sql(url, "SELECT path, status FROM images"))


def decisions(log: str) -> Counter[str]:
    """How many times each path was decided (accepted, or quarantined as a duplicate)."""
    return Counter(m.group(2) for m in re.finditer(
        r"(image_accepted|duplicate_quarantined): (\S+?): ", log))


def test_two_daemons_on_one_database_keep_exactly_one_of_each_pair(pg_url: str,
                                                                   tmp_path: Path) -> None:
    """Two ingest hosts, one group: hundreds of near-duplicate pairs land on both at once."""
    roots = [tmp_path / "host_a" / "drop", tmp_path / "host_b" / "drop"]
    quarantines = [tmp_path / "host_a" / "q", tmp_path / "host_b" / "q"]
    for r in roots:
        r.mkdir(parents=True)
    PostgresStore(pg_url).close()  # schema first, so the start-up race is only the data
    daemons = [DaemonProcess(daemon_config(tmp_path / f"{i}.yaml", pg_url, roots[i],
                                           quarantines[i]), tmp_path / f"{i}.log")
               for i in range(2)]
    seeds = distinct_seeds(200, (320, 240))
    for s in seeds:
        img = photo(s, 320, 240)
        (roots[0] / f"{s}.jpg.tmp").write_bytes(encode(img, 90))
        (roots[1] / f"{s}.jpg.tmp").write_bytes(encode(img, 60))
    for d in daemons:
        d.start()
    try:
        for n, s in enumerate(seeds):  # each pair lands on both hosts at the same instant
            for r in (roots if n % 2 else roots[::-1]):  # who is first alternates
                os.rename(r / f"{s}.jpg.tmp", r / f"{s}.jpg")
        # Kept or quarantined, every file ends with one record (at its final path).
        wait_for(lambda: len(statuses(pg_url)) >= 400, 240, "every file decided")
        recs = statuses(pg_url)
        for s in seeds:
            on_disk = [r / f"{s}.jpg" for r in roots if (r / f"{s}.jpg").exists()]
            assert len(on_disk) == 1, (s, on_disk)
            assert recs[str(on_disk[0])] == "kept"
        in_quarantine = [p for q in quarantines if q.exists() for p in files_under(q)]
        assert len(in_quarantine) == 200
        assert all(recs.get(str(p)) == "quarantined" for p in in_quarantine)
        assert Counter(recs.values()) == {"kept": 200, "quarantined": 200}
        assert all(Path(p).exists() for p in recs)  # the database agrees with the disks
        for d in daemons:
            assert set(decisions(d.log()).values()) <= {1}
    finally:
        codes = [d.stop() for d in daemons]
    assert codes == [0, 0]


def test_a_host_with_a_stale_replica_still_keeps_exactly_one(pg_url: str,
                                                             tmp_path: Path) -> None:
    """Host B is paused (SIGSTOP) while host A takes in originals, then B's replica is
    held stale (its tail's server process is stopped too) while twins of every original
    land on both hosts at once: B's lookups miss the originals, and only the claim's
    re-check in the database stands between it and a second kept copy."""
    if os.geteuid() != 0:
        pytest.skip("stopping a PostgreSQL server process needs root")
    roots = [tmp_path / "host_a" / "drop", tmp_path / "host_b" / "drop"]
    quarantines = [tmp_path / "host_a" / "q", tmp_path / "host_b" / "q"]
    for r in roots:
        r.mkdir(parents=True)
    PostgresStore(pg_url).close()
    db = urlsplit(pg_url).path.lstrip("/")

    def tail_pids() -> set[int]:
        return {pid for (pid,) in sql(pg_url, "SELECT pid FROM pg_stat_activity WHERE "
                                      "application_name = 'dedupd-replica' AND datname = %s",
                                      (db,))}

    host_b = DaemonProcess(daemon_config(tmp_path / "b.yaml", pg_url, roots[1],
                                         quarantines[1]), tmp_path / "b.log").start()
    b_tail = wait_for(tail_pids, 30, "host B's replica tail")
    host_a = DaemonProcess(daemon_config(tmp_path / "a.yaml", pg_url, roots[0],
                                         quarantines[0]), tmp_path / "a.log").start()
    seeds = distinct_seeds(120, (320, 240))
    stopped: list[int] = []
    try:
        host_b.signal(signal.SIGSTOP)
        for pid in b_tail:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        for s in seeds:
            img = photo(s, 320, 240)
            (roots[0] / f".{s}.jpg").write_bytes(encode(img, 90))
            os.rename(roots[0] / f".{s}.jpg", roots[0] / f"{s}.jpg")
            (roots[0] / f"{s}-a.jpg.tmp").write_bytes(encode(img, 75))
            (roots[1] / f"{s}-b.jpg.tmp").write_bytes(encode(img, 60))
        wait_for(lambda: len(statuses(pg_url)) >= len(seeds), 120, "A to take the originals")
        host_b.signal(signal.SIGCONT)  # B runs again; its replica stays stale
        for n, s in enumerate(seeds):  # twins land on both hosts at the same instant
            pair = [(roots[0], f"{s}-a.jpg"), (roots[1], f"{s}-b.jpg")]
            for root, name in (pair if n % 2 else pair[::-1]):
                os.rename(root / f"{name}.tmp", root / name)
        wait_for(lambda: len(statuses(pg_url)) >= 3 * len(seeds), 240, "every twin decided")
        recs = statuses(pg_url)
        assert Counter(recs.values()) == {"kept": len(seeds), "quarantined": 2 * len(seeds)}
        for s in seeds:  # the original stays; both twins go, B's included
            assert recs[str(roots[0] / f"{s}.jpg")] == "kept"
            assert not (roots[1] / f"{s}-b.jpg").exists()
        assert set(decisions(host_b.log()).values()) == {1}
        assert len(decisions(host_b.log())) == len(seeds)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        host_b.signal(signal.SIGCONT)
        codes = [d.stop() for d in (host_a, host_b)]
    assert codes == [0, 0]


def test_records_of_other_hosts_are_trusted_not_forgotten(pg_url: str, tmp_path: Path,
                                                          make_photo) -> None:
    """A path this host cannot see, outside its roots, is another host's file."""
    root, quarantine = tmp_path / "drop", tmp_path / "q"
    root.mkdir()
    original = make_photo("orig.jpg", seed=5, width=320, height=240, root=tmp_path / "x")
    from dedupd.hashing import Recipe, hash_file

    h = hash_file(original, Recipe())
    store = PostgresStore(pg_url)
    store.insert(rec("/elsewhere/host-b/orig.jpg", h.hash, scope="shared").with_(
        recipe=h.recipe.key))
    store.close()
    daemon = DaemonProcess(daemon_config(tmp_path / "c.yaml", pg_url, root, quarantine),
                           tmp_path / "log").start()
    try:
        shutil.copy(original, root / ".copy.jpg")
        os.rename(root / ".copy.jpg", root / "copy.jpg")  # byte-identical
        wait_for(lambda: len(files_under(quarantine)) == 1 if quarantine.exists() else False,
                 30, "the copy quarantined")
        assert statuses(pg_url)["/elsewhere/host-b/orig.jpg"] == "kept"
    finally:
        assert daemon.stop() == 0


# ---------------------------------------------------------------- database restart


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


class PrivateCluster:
    """A throwaway PostgreSQL cluster on a free port, run as the postgres user, so that
    restarting it disturbs nobody else's tests."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="dedupd-pg-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # postgres refuses to run as root
            import pwd

            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self._pg("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust",
                 "--no-sync", "-E", "UTF8")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run([*self.prefix, str(self.bindir / tool), *args], check=True,
                       capture_output=True, timeout=120)

    def start(self) -> None:
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w",
                 "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                 "-c fsync=off", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # not running
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_cluster() -> PrivateCluster:
    bindir = _pg_bin()
    if bindir is None or not (bindir / "pg_ctl").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed "
                    "(apt-get install postgresql)")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.skip("running a private cluster as root needs runuser (util-linux)")
    try:
        cluster = PrivateCluster(bindir)
        cluster.start()
    except (subprocess.CalledProcessError, KeyError) as exc:
        pytest.skip(f"cannot start a private PostgreSQL cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.destroy()


def test_daemon_rides_out_a_database_restart(private_cluster: PrivateCluster,
                                            tmp_path: Path) -> None:
    url = private_cluster.url
    root, quarantine = tmp_path / "drop", tmp_path / "q"
    root.mkdir()
    seeds = distinct_seeds(30, (320, 240))
    pairs = {s: (encode(photo(s, 320, 240), 90), encode(photo(s, 320, 240), 60)) for s in seeds}

    def drop(batch: list[int]) -> None:
        for s in batch:
            for tag, data in zip("ab", pairs[s], strict=True):
                (root / f".{s}{tag}.jpg").write_bytes(data)
                os.rename(root / f".{s}{tag}.jpg", root / f"{s}{tag}.jpg")

    notify = NotifySocket(str(tmp_path / "notify.sock"))
    daemon = DaemonProcess(daemon_config(tmp_path / "c.yaml", url, root, quarantine),
                           tmp_path / "log", env={"NOTIFY_SOCKET": notify.address})
    daemon.start()

    def status_has(text: str, present: bool = True) -> bool:
        msg = notify.recv(0.5) or {}
        return "STATUS" in msg and (text in msg["STATUS"]) == present

    try:
        drop(seeds[:10])
        wait_for(lambda: len(statuses(url)) == 20, 60, "the first pairs decided")
        drop(seeds[10:20])  # in flight while the server goes down
        private_cluster.stop()
        wait_for(lambda: status_has("store unavailable"), 60, "STATUS to report the outage")
        drop(seeds[20:])  # lands during the outage: waits in the queue

        def waiting() -> int:
            msg = notify.recv(0.5) or {}
            found = re.search(r"store unavailable.*queue (\d+)", msg.get("STATUS", ""))
            return int(found.group(1)) if found else 0

        wait_for(lambda: waiting() >= 20, 60, "the outage's files waiting in the queue")
        assert "store_unavailable" in daemon.log()
        assert daemon.proc.poll() is None
        private_cluster.start()
        wait_for(lambda: "store_recovered" in daemon.log(), 60, "the daemon to reconnect")
        wait_for(lambda: status_has("store unavailable", present=False), 30,
                 "STATUS to clear")
        wait_for(lambda: len(statuses(url)) == 60 and quarantine.exists()
                 and len(files_under(quarantine)) == 30, 90, "every pair decided")
        recs = statuses(url)
        for s in seeds:  # one of each pair kept, the other quarantined; nothing lost
            here = [t for t in "ab" if (root / f"{s}{t}.jpg").exists()]
            assert len(here) == 1, (s, here)
            assert recs[str(root / f"{s}{here[0]}.jpg")] == "kept"
        assert all(recs.get(str(p)) == "quarantined" for p in files_under(quarantine))
        assert all(Path(p).exists() for p in recs)
        # Each file decided once: the twin of a file a worker held when the server went
        # down is not decided first once it is back (and then replaced by it).
        twice = sorted(p for p, n in decisions(daemon.log()).items() if n > 1)
        assert not twice, f"decided twice after the outage: {twice}"
        assert len(decisions(daemon.log())) == 60
        pending = sql(url, "SELECT count(*) FROM quarantine WHERE state = 'pending'")
        assert pending == [(0,)]
    finally:
        code = daemon.stop()
        notify.close()
    assert code == 0


def test_copies_found_by_the_start_up_scan_are_decided_once(pg_url: str,
                                                             tmp_path: Path) -> None:
    """The restart test's 'decided twice' under load: its drop races the start-up scan.
    Copies the scan finds are queued in the listing's order, not oldest first; a later
    copy was accepted, then quarantined when its older original came (keep: first):
    two decisions of one file. Here every pair is written while the daemon is down."""
    root, quarantine = tmp_path / "drop", tmp_path / "q"
    root.mkdir()
    when = time.time_ns() - 3_600 * 10**9
    seeds = distinct_seeds(16, (320, 240))
    for s in seeds:  # the original an hour ago, its copy a second later
        for tag, quality, at in (("first", 90, when), ("later", 60, when + 10**9)):
            path = root / f"{s}{tag}.jpg"
            path.write_bytes(encode(photo(s, 320, 240), quality))
            os.utime(path, ns=(at, at))
        when += 2 * 10**9
    daemon = DaemonProcess(daemon_config(tmp_path / "c.yaml", pg_url, root, quarantine),
                           tmp_path / "log")
    daemon.start()
    try:
        # A replaced copy's original is not said accepted: count decisions, not paths.
        wait_for(lambda: sum(decisions(daemon.log()).values()) >= 32, 120,
                 "every file decided")
        assert set(decisions(daemon.log()).values()) == {1}, "a file was decided twice"
        assert {p.name for p in root.iterdir()} == {f"{s}first.jpg" for s in seeds}
    finally:
        code = daemon.stop()
    assert code == 0


# ---------------------------------------------------------------- replicas and claims


def test_claims_find_what_a_lagging_replica_missed(pg_url: str) -> None:
    """Two hosts' stores: a lookup answered from a replica that has not seen the other
    host's look-alike yet still cannot keep both (the claim re-checks in the database);
    the tail brings the replica up to date; deleted hits are re-read, not trusted."""
    a, b = PostgresStore(pg_url), PostgresStore(pg_url)
    a.insert_many([rec(f"/old/{i}", i * 0x9E3779B97F4A7C15 % 2**64) for i in range(2000)])
    a.warm("s", RECIPE)
    b.warm("s", RECIPE)
    assert a.live_count("s", RECIPE) == b.live_count("s", RECIPE) == 2000
    try:
        first, twin = rec("/a/new.jpg", 0xDEADBEEF12345678), rec("/b/new.jpg",
                                                                   0xDEADBEEF12345678 ^ 0b101)
        seen_a = a.lookup("s", RECIPE, first.hash, first.digest, 4)
        seen_b = b.lookup("s", RECIPE, twin.hash, twin.digest, 4)
        assert seen_a.matches == seen_b.matches == []  # neither knows of the other
        assert a.claim(first, 4, seen_a) == []
        lost = b.claim(twin, 4, seen_b)  # b's look was older than a's claim
        assert [(m.record.path, m.distance) for m in lost] == [("/a/new.jpg", 2)]
        assert b.get_by_path("/b/new.jpg") is None  # nothing written by the loser
        # Byte-identical content is caught too (by digest), at any distance.
        copy = rec("/b/copy.jpg", 0x7A5A5A5A5A5A5A5A, digest="d-/a/new.jpg")
        horizon = b.lookup("s", RECIPE, copy.hash, None, 4).horizon
        assert [m.identical for m in b.claim(copy, 4, Lookup([], horizon))] == [True]
        # The tail delivers a's row to b's replica without anyone asking.
        wait_for(lambda: [m.record.path for m in b.lookup("s", RECIPE, twin.hash, None,
                                                          4).matches] == ["/a/new.jpg"],
                 10, "b's replica to see a's claim")
        # A deleted record is never a match, though b's replica still held it.
        a.delete(a.get_by_path("/a/new.jpg").id)
        assert b.lookup("s", RECIPE, twin.hash, None, 4).matches == []
        assert b.claim(twin, 4, b.lookup("s", RECIPE, twin.hash, twin.digest, 4)) == []
        # A replica from another server start is refused by the claim, which falls back
        # to the database's indexes (and the tail reloads it).
        coll = b._colls[("s", RECIPE)]
        replica = b._replicas.get(coll)
        replica.epoch = replica.epoch.replace(year=2000)
        late = rec("/b/late.jpg", 0x0F0F0F0F0F0F0F0F)
        a.insert(rec("/a/late.jpg", 0x0F0F0F0F0F0F0F0E))
        stale = Lookup([], (replica, replica.watermark + 10**9))  # would miss a's row
        assert [m.record.path for m in b.claim(late, 4, stale)] == ["/a/late.jpg"]
        wait_for(lambda: b._replicas.get(coll) not in (None, replica), 10,
                 "the tail to reload the replica")
        live = sql(pg_url, "SELECT count(*) FROM images WHERE status = 'kept'")[0][0]
        assert b.live_count("s", RECIPE) == a.live_count("s", RECIPE) == live == 2002
    finally:
        a.close()
        b.close()


def test_synchronous_commit_off_in_the_dsn_relaxes_only_claims(pg_url: str) -> None:
    """Claims are flushed one by one unless the DSN says synchronous_commit=off (the
    embedded store's trade-off); quarantine journal writes are flushed either way."""
    for dsn, durable in ((pg_url, True), (pg_url + "?options=-csynchronous_commit%3Doff",
                                          False)):
        store = PostgresStore(dsn)
        try:
            assert store.durable is durable
            store.warm("s", RECIPE)
            r = rec(f"/c/{durable}", 0xABCDEF00)
            assert store.claim(r, 4, store.lookup("s", RECIPE, r.hash, r.digest, 4)) == []
            entry = store.add_quarantine(QuarantineEntry(r.path, "/q" + r.path, "/x", 1,
                                                         "ab", "default"))
            store.update_quarantine(replace(entry, state=DONE))
            assert store.get_quarantine(entry.id).state == DONE
        finally:
            store.close()


def test_two_hosts_ride_out_a_database_crash_mid_burst(private_cluster: PrivateCluster,
                                                      tmp_path: Path) -> None:
    """Twins land on two hosts while the server is killed (immediate stop: commits not
    yet flushed are lost) and restarted: every pair still ends with exactly one kept,
    nothing is decided twice, and the replicas of the old server start are not trusted
    (claims made against them are refused, the tails reload)."""
    url = private_cluster.url
    roots = [tmp_path / "host_a" / "drop", tmp_path / "host_b" / "drop"]
    quarantines = [tmp_path / "host_a" / "q", tmp_path / "host_b" / "q"]
    for r in roots:
        r.mkdir(parents=True)
    PostgresStore(url).close()
    seeds = distinct_seeds(40, (320, 240))
    for s in seeds:
        img = photo(s, 320, 240)
        (roots[0] / f"{s}.jpg.tmp").write_bytes(encode(img, 90))
        (roots[1] / f"{s}.jpg.tmp").write_bytes(encode(img, 60))
    hosts = [DaemonProcess(daemon_config(tmp_path / f"{i}.yaml", url, roots[i], quarantines[i],
                                         workers=1), tmp_path / f"{i}.log").start()
             for i in range(2)]

    def land(batch: list[int]) -> None:
        for n, s in enumerate(batch):
            for r in (roots if n % 2 else roots[::-1]):
                os.rename(r / f"{s}.jpg.tmp", r / f"{s}.jpg")

    try:
        land(seeds[:10])
        wait_for(lambda: len(statuses(url)) == 20, 60, "the first pairs decided")
        land(seeds[10:25])  # in flight when the server dies
        private_cluster.stop("immediate")
        wait_for(lambda: all("store_unavailable" in h.log() for h in hosts), 60,
                 "both hosts to notice the outage")
        land(seeds[25:])  # lands during the outage
        private_cluster.start()
        wait_for(lambda: all("store_recovered" in h.log() for h in hosts), 60,
                 "both hosts to reconnect")
        wait_for(lambda: len(statuses(url)) == 80, 120, "every file decided")
        recs = statuses(url)
        for s in seeds:
            here = [r / f"{s}.jpg" for r in roots if (r / f"{s}.jpg").exists()]
            assert len(here) == 1, (s, here)
            assert recs[str(here[0])] == "kept"
        assert Counter(recs.values()) == {"kept": 40, "quarantined": 40}
        assert all(Path(p).exists() for p in recs)
        logged = Counter()
        for h in hosts:
            logged.update(decisions(h.log()))
        assert set(logged.values()) == {1} and len(logged) == 80, "decided twice or never"
    finally:
        codes = [h.stop() for h in hosts]
    assert codes == [0, 0]
