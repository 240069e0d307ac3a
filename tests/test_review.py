"""`dedupd review` on real parts: a real daemon's quarantine, the review server as a
subprocess, real HTTP, and a headless Chromium clicking its buttons."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import photo, write_image
from daemonproc import DaemonProcess, wait_for, write_config
from test_deploy import as_nobody, needs_root

from dedupd.config import load_config, parse_config
from dedupd.quarantine import NOT_A_DUPLICATE, QuarantineError
from dedupd.review.app import TOKEN_COOKIE, create_app, filter_from
from dedupd.review.model import Review, shown
from dedupd.review.thumbs import ThumbnailCache
from dedupd.store import QuarantineEntry, open_store
from dedupd.store.base import DONE, PURGED, RESTORED, QuarantineFilter

PHOTOS = Path(__file__).resolve().parent / "fixtures" / "photos"
NAMES = ("astronaut", "chelsea", "coffee", "hubble", "rocket")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def near_copy(src: Path, dst: Path) -> None:
    """A look-alike: cropped 2% each side, resized, brightened, re-encoded (distance 3-10
    from the fixture photos)."""
    img = cv2.imread(str(src))
    h, w = img.shape[:2]
    img = img[h // 50:h - h // 50, w // 50:w - w // 50]
    img = cv2.resize(img, (w * 3 // 5, h * 3 // 5), interpolation=cv2.INTER_AREA)
    img = cv2.convertScaleAbs(img, alpha=1.1, beta=10)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert ok
    dst.write_bytes(buf.tobytes())


class Site:
    """A daemon that quarantined some look-alikes, and what it did."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.root = tmp, tmp / "photos"
        self.config, self.db = tmp / "dedupd.yaml", tmp / "state" / "index.sqlite"

    def write_config(self) -> None:
        self.root.mkdir()
        write_config(self.config, {
            "index": str(self.db), "quarantine_dir": str(self.tmp / "state" / "quarantine"),
            "settle_seconds": 0.2, "workers": 1,
            "policies": {"default": {"max_distance": 10}},
            "watches": [{"path": str(self.root)}]})

    def entries(self) -> list[QuarantineEntry]:
        store = open_store(str(self.db))
        try:
            return store.list_quarantine()
        finally:
            store.close()

    def entry(self, entry_id: int) -> QuarantineEntry:
        return next(e for e in self.entries() if e.id == entry_id)


@pytest.fixture(scope="module")
def site_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quarantine made once by a real daemon: 5 photos kept, 4 look-alikes and one
    byte-identical copy quarantined. Each test gets its own copy of it."""
    tmp = tmp_path_factory.mktemp("site")
    site = Site(tmp)
    site.write_config()
    daemon = DaemonProcess(site.config, tmp / "daemon.log",
                           env={"XDG_STATE_HOME": str(tmp / "xdg")}).start()
    try:
        for name in NAMES:
            shutil.copyfile(PHOTOS / f"{name}.jpg", site.root / f"{name}.jpg")
        wait_for(lambda: daemon.log_since_start().count("accepted") >= 5, 60, "5 accepted")
        for name in NAMES[:4]:
            near_copy(PHOTOS / f"{name}.jpg", site.root / f"{name}-small.jpg")
        shutil.copyfile(PHOTOS / "rocket.jpg", site.root / "rocket-copy.jpg")
        wait_for(lambda: daemon.log_since_start().count("duplicate_quarantined") >= 5, 60,
                 "5 quarantined")
    finally:
        assert daemon.stop() == 0
    return tmp


@pytest.fixture
def site(site_template: Path, tmp_path: Path) -> Site:
    """A private copy of the template site: same absolute layout under tmp_path/site."""
    dst = tmp_path / "site"
    shutil.copytree(site_template, dst, symlinks=True)
    # The store names absolute paths of the template: rewrite their prefix (only: the
    # quarantine's layout repeats the root's path below it). The scope too, or a file
    # dropped into the copy's root would be compared with none of the template's.
    import sqlite3

    conn = sqlite3.connect(dst / "state" / "index.sqlite")
    with conn:
        for table, cols in (("images", ("scope", "path")), ("rejections", ("path",)),
                            ("quarantine", ("original_path", "quarantine_path",
                                            "matched_path"))):
            for col in cols:
                conn.execute(f"UPDATE {table} SET {col} = ? || substr({col}, ?)",
                             (str(dst), len(str(site_template)) + 1))
    conn.close()
    for snap in (dst / "state").glob("index.sqlite.hamming-*"):
        snap.unlink()
    text = (dst / "dedupd.yaml").read_text().replace(str(site_template), str(dst))
    (dst / "dedupd.yaml").write_text(text)
    return Site(dst)


class Server:
    """`dedupd review` as a subprocess; its URL read from its --json start-up line."""

    def __init__(self, site: Site, *extra: str) -> None:
        self.log_path = site.tmp / "review.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dedupd", "--config", str(site.config), "--log", "json",
             "review", "--json", "--listen", "127.0.0.1:0", "--cache",
             str(site.tmp / "cache"), *extra],
            stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, "XDG_STATE_HOME": str(site.tmp / "xdg")})
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line, self.log()
        self.url = json.loads(line)["url"]
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), _NoRedirect())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, kind: str) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("event") == kind:
                out.append(obj)
        return out

    def get(self, path: str = "", headers: dict[str, str] | None = None
            ) -> tuple[int, bytes, dict[str, str]]:
        return self._open(urllib.request.Request(self.url.rstrip("/") + "/" + path.lstrip("/"),
                                                 headers=headers or {}))

    def post(self, form: list[tuple[str, str]]) -> tuple[int, bytes, dict[str, str]]:
        return self._open(urllib.request.Request(
            self.url.rstrip("/") + "/action", data=urllib.parse.urlencode(form).encode(),
            method="POST"))

    def _open(self, req: urllib.request.Request) -> tuple[int, bytes, dict[str, str]]:
        try:
            with self.opener.open(req, timeout=30) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read(), dict(err.headers)

    def csrf(self) -> str:
        status, body, _ = self.get("/")
        assert status == 200
        return re.search(rb'name="csrf_token" value="([^"]+)"', body).group(1).decode()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self._log.close()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None  # the test looks at the 303 itself


@pytest.fixture
def server(site: Site) -> Iterator[Server]:
    s = Server(site)
    yield s
    s.stop()


def pair_ids(body: bytes) -> list[int]:
    return [int(x) for x in re.findall(rb'<li class="pair" id="entry-(\d+)"', body)]


# ---------------------------------------------------------------- over HTTP


def test_page_shows_every_pair_newest_first_with_thumbnails(site: Site, server: Server) -> None:
    done = [e for e in site.entries() if e.state == DONE]
    assert len(done) == 5
    status, body, headers = server.get("/")
    assert status == 200
    assert pair_ids(body) == sorted((e.id for e in done), reverse=True)
    assert b'<span id="total">5</span>' in body
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert b"byte-identical" in body  # the rocket copy
    assert b"<script" not in body
    for e in done:
        for side in ("quarantined", "kept"):
            status, jpeg, headers = server.get(f"/thumb/{e.id}/{side}")
            assert status == 200 and headers["Content-Type"] == "image/jpeg"
            thumb = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            assert thumb is not None and max(thumb.shape[:2]) <= 240
    assert len(list((site.tmp / "cache").glob("*.jpg"))) == 10  # cached server-side


def test_filters_narrow_the_page(site: Site, server: Server) -> None:
    done = [e for e in site.entries() if e.state == DONE]
    assert sorted(e.distance for e in done) == [0, 3, 6, 7, 10]
    status, body, _ = server.get("/?dmax=0")
    assert pair_ids(body) == [e.id for e in done if e.distance == 0]
    status, body, _ = server.get("/?dmin=4&dmax=7")
    assert pair_ids(body) == sorted((e.id for e in done if 4 <= e.distance <= 7), reverse=True)
    status, body, _ = server.get("/?" + urllib.parse.urlencode({"root": "/elsewhere"}))
    assert pair_ids(body) == [] and b"nothing here" in body
    for bad in ("dmin=x", "before=99999999999999999999999", "since=2026-13-45", "after=-",
                "flag=transform%20IS%20NULL%20OR%201"):
        assert server.get(f"/?{bad}")[0] == 400, bad


def test_thumbnails_only_of_files_the_store_knows(site: Site, server: Server) -> None:
    entry = next(e for e in site.entries() if e.state == DONE)
    assert server.get("/thumb/9999/kept")[0] == 404
    assert server.get(f"/thumb/{entry.id}/other")[0] == 404
    assert server.get(f"/thumb/{entry.id}/..%2F..%2Fetc%2Fpasswd")[0] == 404
    # A symlink planted where the quarantined file was is never followed.
    q = Path(entry.quarantine_path)
    q.unlink()
    q.symlink_to(site.root / "coffee.jpg")
    assert server.get(f"/thumb/{entry.id}/quarantined")[0] == 404


def test_forged_actions_are_refused(site: Site, server: Server) -> None:
    entry = next(e for e in site.entries() if e.state == DONE)
    for form in ([("act", f"restore:{entry.id}")],
                 [("act", f"restore:{entry.id}"), ("csrf_token", "forged")]):
        status, body, _ = server.post(form)
        assert status == 400 and b"refused" in body and b"CSRF" in body
    assert site.entry(entry.id).state == DONE
    assert Path(entry.quarantine_path).exists() and not Path(entry.original_path).exists()
    assert server.events("restored") == []
    # A page reached under another host name (DNS rebinding) is refused too.
    assert server.get("/", {"Host": "evil.example:80"})[0] == 400


def test_actions_go_through_the_cli_code_paths(site: Site, server: Server) -> None:
    done = sorted((e for e in site.entries() if e.state == DONE), key=lambda e: e.id)
    token = server.csrf()
    a, b, c, d = done[:4]
    status, _, headers = server.post([("csrf_token", token), ("act", f"not_duplicate:{a.id}")])
    assert status == 303
    assert site.entry(a.id).state == RESTORED and site.entry(a.id).reason == NOT_A_DUPLICATE
    assert Path(a.original_path).exists() and not Path(a.quarantine_path).exists()
    status, _, _ = server.post([("csrf_token", token), ("act", f"confirm:{b.id}")])
    assert status == 303 and site.entry(b.id).state == PURGED
    assert not Path(b.quarantine_path).exists() and not Path(b.original_path).exists()
    # A selection: two at once.
    status, _, _ = server.post([("csrf_token", token), ("act", "restore"),
                                ("ids", str(c.id)), ("ids", str(d.id))])
    assert status == 303
    assert {site.entry(c.id).state, site.entry(d.id).state} == {RESTORED}
    restored = {e["path"] for e in server.events("restored")}
    assert restored == {a.original_path, c.original_path, d.original_path}
    assert [e.get("reason") for e in server.events("restored")
            if e["path"] == a.original_path] == [NOT_A_DUPLICATE]
    # The second try on a restored entry is refused, in one line, nothing moves.
    status, _, headers = server.post([("csrf_token", token), ("act", f"restore:{a.id}")])
    status, body, _ = server.get(headers["Location"])
    assert b"not done" in body and b"not quarantined" in body
    # Paths are never accepted in place of ids.
    status, _, _ = server.post([("csrf_token", token), ("act", "restore"),
                                ("ids", a.quarantine_path)])
    assert status == 400


def test_read_only_shows_but_never_acts(site: Site) -> None:
    server = Server(site, "--read-only")
    try:
        status, body, _ = server.get("/")
        assert status == 200 and len(pair_ids(body)) == 5
        assert b'method="post"' not in body and b"csrf_token" not in body
        entry = next(e for e in site.entries() if e.state == DONE)
        assert server.post([("act", f"restore:{entry.id}")])[0] == 403
        assert site.entry(entry.id).state == DONE
    finally:
        server.stop()


def test_away_from_loopback_every_request_needs_the_token(site: Site) -> None:
    config = parse_config(__import__("yaml").safe_load(site.config.read_text()), "c.yaml")
    store = open_store(str(site.db))
    try:
        app = create_app(Review(config, store), ThumbnailCache(None, config.max_pixels),
                         host="192.0.2.10", port=9469, token="s3cret")
        client = app.test_client()
        assert client.get("/", base_url="http://192.0.2.10:9469").status_code == 403
        assert client.get("/?token=wrong", base_url="http://192.0.2.10:9469").status_code == 403
        first = client.get("/?token=s3cret", base_url="http://192.0.2.10:9469")
        assert first.status_code == 200
        assert TOKEN_COOKIE in first.headers["Set-Cookie"]
        assert "HttpOnly" in first.headers["Set-Cookie"]
        # The cookie carries it from then on.
        assert client.get("/", base_url="http://192.0.2.10:9469").status_code == 200
    finally:
        store.close()


def test_file_names_are_data_on_the_page(tmp_path: Path) -> None:
    """Markup and bytes that are not UTF-8 in a file name are shown, never run or fatal."""
    store = open_store(str(tmp_path / "i.sqlite"))
    try:
        root = tmp_path / "root"
        for name in ("<script>alert(1)</script>.jpg",):
            store.add_quarantine(QuarantineEntry(
                original_path=f"{root}/{name}", quarantine_path=f"{tmp_path}/q/{name}",
                matched_path=f"{root}/\"><img src=x onerror=alert(2)>.jpg", distance=1,
                hash="0", policy="default", state=DONE))
        config = parse_config({"watches": [str(root)],
                               "quarantine_dir": str(tmp_path / "q")}, "c.yaml")
        app = create_app(Review(config, store), ThumbnailCache(None, config.max_pixels),
                         host="127.0.0.1", port=9469)
        page = app.test_client().get("/", base_url="http://127.0.0.1:9469")
        assert page.status_code == 200
        body = page.get_data(as_text=True)
        assert "<script>alert" not in body and "<img src=x" not in body
        assert "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in body
    finally:
        store.close()
    # Bytes that are not UTF-8 (os.fsdecode's surrogates) print as U+FFFD, not a 500.
    assert shown("/d/caf\udce9.jpg") == "/d/caf\ufffd.jpg"


def test_static_gallery(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "gallery"
    summary = gallery(site, out)
    assert summary["entries"] == 5 and summary["thumbnails"] == 10 and summary["pages"] == 1
    html = (out / "index.html").read_bytes()
    assert len(pair_ids(html)) == 5
    assert b'method="post"' not in html and b"csrf" not in html
    for src in re.findall(rb'<img src="([^"]+)"', html):
        assert cv2.imread(str(out / src.decode())) is not None
    assert (out / "review.css").exists()


def review_cli(site: Site, *args: str, check: int = 0) -> subprocess.CompletedProcess[str]:
    """`dedupd --config SITE review *args`, with the exit status it must give."""
    run = subprocess.run(
        [sys.executable, "-m", "dedupd", "--config", str(site.config), "review", *args],
        capture_output=True, text=True,
        env={**os.environ, "XDG_STATE_HOME": str(site.tmp / "xdg")})
    assert run.returncode == check, run.stderr or run.stdout
    return run


def gallery(site: Site, out: Path, *options: str) -> dict[str, int]:
    """The summary of `review --json --html out *options`."""
    return json.loads(review_cli(site, "--json", "--html", str(out), "--cache",
                                 str(site.tmp / "cache"), *options).stdout)


def test_gallery_pending_page_takes_the_gallery_filters(tmp_path: Path) -> None:
    """Duplicates the real pipeline could not move (the quarantine directory is a file)
    in two roots under two policies: the gallery's pending.html lists and counts only
    those its filters select, as its pages do, not the newest of all."""
    from conftest import write_image

    from dedupd.config import load_config
    from dedupd.hashing import hash_file
    from dedupd.pipeline import Pipeline
    from dedupd.store.base import UNRESOLVED

    site = Site(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "quarantine").write_text("not a directory")
    write_config(site.config, {
        "index": str(site.db), "quarantine_dir": str(tmp_path / "state" / "quarantine"),
        "policies": {"default": {"max_distance": 10}, "loose": {"max_distance": 10}},
        "watches": [{"path": str(a), "policy": "loose"}, {"path": str(b)}]})
    for root, name in ((a, "coffee"), (a, "hubble"), (b, "rocket")):
        write_image(root / f"{name}.jpg", cv2.imread(str(PHOTOS / f"{name}.jpg")))
    write_image(a / "grey.png", np.full((300, 400, 3), 128, np.uint8))
    originals = sorted(p for p in tmp_path.glob("[ab]/*") if p.is_file())
    shutil.copyfile(a / "coffee.jpg", a / "coffee-copy.jpg")
    shutil.copyfile(a / "grey.png", a / "grey-copy.png")
    near_copy(a / "hubble.jpg", a / "hubble-small.jpg")
    near_copy(b / "rocket.jpg", b / "rocket-small.jpg")
    cfg = load_config(site.config)
    store = open_store(cfg.index)
    try:
        pipeline = Pipeline(cfg, store)
        for path in [*originals, *sorted({*tmp_path.glob("[ab]/*")} - {*originals})]:
            watch = next(w for w in cfg.watches if path.parent == w.path)
            pipeline.ingest(path, watch, hash_file(path, cfg.recipe, cfg.max_pixels),
                            path.stat().st_mtime_ns, None)
        pending, total = store.with_status(UNRESOLVED, 10)
        assert total == 4 and store.list_quarantine() == []
        ids = {Path(r.path).name: r.id for r in pending}
        days = [time.strftime("%Y-%m-%d", time.gmtime(r.first_seen)) for r in pending]
    finally:
        store.close()
    assert set(ids) == {"coffee-copy.jpg", "grey-copy.png", "hubble-small.jpg",
                        "rocket-small.jpg"}
    for options, want in (((), set(ids)),
                          (("--flag", "low_information"), {"grey-copy.png"}),
                          (("--flag", "transform"), set()),
                          (("--root", str(b)), {"rocket-small.jpg"}),
                          (("--policy", "loose"), set(ids) - {"rocket-small.jpg"}),
                          (("--max-distance", "0"), {"coffee-copy.jpg", "grey-copy.png"}),
                          (("--min-distance", "1", "--root", str(a)), {"hubble-small.jpg"}),
                          (("--since", min(days), "--until", max(days)), set(ids)),
                          (("--until", "2020-01-01"), set())):
        out = tmp_path / ("gallery" + "".join(options).replace("/", "_"))
        assert gallery(site, out, *options)["pending"] == len(want), options
        if not want:
            assert not (out / "pending.html").exists(), options
            continue
        page = (out / "pending.html").read_text()
        listed = {int(i) for i in re.findall(r'id="pending-(\d+)"', page)}
        assert listed == {ids[n] for n in want}, options
        assert f'<span id="total">{len(want)}</span>' in page
        assert ("filters select" in page) == bool(options), options
        assert f'href="pending.html">{len(want)} unresolved' in (out / "index.html").read_text()


def test_gallery_pages_link_to_each_other(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "i.sqlite"))
    try:
        for i in range(120):
            store.add_quarantine(QuarantineEntry(
                original_path=f"/data/{i}.jpg", quarantine_path=f"{tmp_path}/q/{i}.jpg",
                matched_path=f"/data/k{i}.jpg", distance=1, hash="0", policy="default",
                state=DONE))
        config = parse_config({"watches": ["/data"], "quarantine_dir": str(tmp_path / "q")},
                              "c.yaml")
        from dedupd.review.gallery import write_gallery

        counts = write_gallery(Review(config, store), ThumbnailCache(None, 10**6),
                               tmp_path / "g", QuarantineFilter())
        assert counts == {"pages": 3, "entries": 120, "thumbnails": 0, "pending": 0}
        first, second, last = ((tmp_path / "g" / n).read_text()
                               for n in ("index.html", "page-2.html", "page-3.html"))
        assert 'href="page-2.html" rel="next"' in first and 'rel="prev"' not in first
        assert 'href="index.html" rel="prev"' in second and 'href="page-3.html"' in second
        assert 'rel="next"' not in last and last.count('class="pair"') == 20
        assert "no image" in first  # files that are not there: no broken <img>
        assert not (tmp_path / "g" / "pending.html").exists() and "pending.html" not in first
        limited = write_gallery(Review(config, store), ThumbnailCache(None, 10**6),
                                tmp_path / "h", QuarantineFilter(), limit=60)
        assert limited["entries"] == 60 and limited["pages"] == 2
        assert 'rel="next"' not in (tmp_path / "h" / "page-2.html").read_text()
    finally:
        store.close()


def test_thumbnails_refuse_bombs_and_non_images(tmp_path: Path) -> None:
    from dedupd.review.thumbs import ThumbnailError

    big = tmp_path / "big.png"
    cv2.imwrite(str(big), np.zeros((200, 300, 3), np.uint8))
    text = tmp_path / "x.jpg"
    text.write_text("not an image")
    cache = ThumbnailCache(tmp_path / "cache", max_pixels=10_000)
    for path in (big, text, tmp_path / "missing.jpg", tmp_path):
        with pytest.raises(ThumbnailError):
            cache.get(str(path))
    assert list((tmp_path / "cache").iterdir()) == []
    assert ThumbnailCache(tmp_path / "cache", max_pixels=10**6).get(str(big))[:2] == b"\xff\xd8"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A temp dir other users can reach (pytest's own is private to its user)."""
    path = Path(tempfile.mkdtemp(prefix="dedupd-review-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_a_restore_the_reviewer_may_not_do_changes_nothing(shared_dir: Path) -> None:
    """As an unprivileged user who can read the quarantine but write neither it nor the
    dataset: the restore fails in one line, and the journal and the file stay as they
    were (root would hide this)."""
    from conftest import photo, write_image

    from dedupd.quarantine import Quarantine
    from dedupd.store import ImageRecord

    root, state = shared_dir / "root", shared_dir / "state"
    state.mkdir()
    src = write_image(root / "dup.jpg", photo(1, 64, 48))
    config = parse_config({"index": str(state / "i.sqlite"), "quarantine_dir":
                           str(shared_dir / "q"), "watches": [str(root)]}, "c.yaml")
    store = open_store(config.index)
    record = ImageRecord(scope=str(root), path=str(src), recipe="dhash:8:fast:area:v1",
                         hash=1, digest="d", file_size=src.stat().st_size, mtime_ns=1,
                         width=64, height=48)
    entry = Quarantine(store, config.quarantine_dir).move_in(
        src, root, record=record, matched_path=str(root / "orig.jpg"), distance=2,
        hash_hex="1", policy="default")
    store.close()
    for path in [state, *state.iterdir()]:  # the store is the reviewer's; nothing else
        os.chown(path, 65534, 65534)

    def restore() -> int:
        store = open_store(config.index)
        try:
            Review(config, store).act("restore", entry.id)  # type: ignore[arg-type]
        except QuarantineError as exc:
            return 3 if "ermission denied" in str(exc) and "\n" not in str(exc) else 4
        finally:
            store.close()
        return 0

    assert as_nobody(restore) == 3
    assert Path(entry.quarantine_path).exists() and not src.exists()
    store = open_store(config.index)
    try:
        assert store.get_quarantine(entry.id).state == DONE  # type: ignore[union-attr]
        assert store.get_by_path(entry.quarantine_path) is not None
    finally:
        store.close()


def test_unresolved_duplicates_are_listed_and_counted(tmp_path: Path) -> None:
    """Duplicates left in place (here: the circuit breaker tripped) are on the review's
    pending page, with thumbnails, and in the pending-quarantines gauge."""
    from test_metrics import free_port, scrape, total

    site = Site(tmp_path)
    site.root.mkdir()
    port = free_port()
    write_config(site.config, {
        "index": str(site.db), "quarantine_dir": str(tmp_path / "state" / "quarantine"),
        "settle_seconds": 0.2, "watches": [{"path": str(site.root)}],
        "circuit_breaker": {"window": 2, "min_decisions": 2, "threshold": 0.5},
        "metrics": {"listen": f"127.0.0.1:{port}"}})
    daemon = DaemonProcess(site.config, tmp_path / "daemon.log").start()
    try:
        shutil.copyfile(PHOTOS / "coffee.jpg", site.root / "coffee.jpg")
        wait_for(lambda: "coffee.jpg: accepted" in daemon.log_since_start(), 30, "kept")
        shutil.copyfile(PHOTOS / "coffee.jpg", site.root / "b.jpg")
        wait_for(lambda: not (site.root / "b.jpg").exists(), 30, "b quarantined")
        shutil.copyfile(PHOTOS / "coffee.jpg", site.root / "c.jpg")  # trips the breaker
        wait_for(lambda: "circuit_open" in daemon.log_since_start(), 30, "the breaker")
        wait_for(lambda: "unresolved" in daemon.log_since_start(), 30, "c unresolved")
        samples = scrape(port)
        assert total(samples, "dedupd_pending_quarantines") == 1
        assert total(samples, "dedupd_circuit_open", root=str(site.root)) == 1
    finally:
        assert daemon.stop() == 0
    server = Server(site)
    try:
        status, body, _ = server.get("/pending")
        assert status == 200 and b'<span id="total">1</span>' in body
        [record_id] = re.findall(rb'id="pending-(\d+)"', body)
        assert b"c.jpg" in body and b"coffee.jpg" in body
        for side in ("quarantined", "kept"):
            status, jpeg, _ = server.get(f"/thumb/pending/{int(record_id)}/{side}")
            assert status == 200 and jpeg[:2] == b"\xff\xd8"
        assert server.get(f"/thumb/pending/{int(record_id) - 1}/quarantined")[0] == 404
        assert b'href="/pending"' in server.get("/")[1]
    finally:
        server.stop()
    # The static gallery lists it too, with its thumbnails, linked from its first page.
    out = tmp_path / "gallery"
    assert gallery(site, out)["pending"] == 1
    assert 'href="pending.html">1 unresolved' in (out / "index.html").read_text()
    page = (out / "pending.html").read_bytes()
    assert re.findall(rb'id="pending-(\d+)"', page) == [record_id]
    assert b"c.jpg" in page and b'href="index.html"' in page and b"/thumb/" not in page
    srcs = re.findall(rb'<img src="([^"]+)"', page)
    assert len(srcs) == 2
    for src in srcs:
        assert cv2.imread(str(out / src.decode())) is not None


# ---------------------------------------------------------------- paging, both backends


def test_keyset_paging_and_filters(store_url: str, tmp_path: Path) -> None:
    """130 entries: every page walk, forward and back, sees each match exactly once."""
    store = open_store(store_url)
    try:
        ids = {}
        for i in range(130):
            root = "/data/a" if i % 3 else "/data/b"
            e = store.add_quarantine(QuarantineEntry(
                original_path=f"{root}/{i}.jpg", quarantine_path=f"/q/{i}.jpg",
                matched_path=f"{root}/k{i}.jpg", distance=i % 7, hash="0",
                policy="strict" if i % 2 else "default", created=1_700_000_000 + i * 3600,
                state=DONE if i % 10 else RESTORED, transform="rot90" if i % 4 == 1 else None,
                low_information=i % 5 == 2))
            ids[e.id] = e
        config = parse_config({"watches": ["/data/a", "/data/b"],
                               "quarantine_dir": str(tmp_path / "q")}, "c.yaml")
        review = Review(config, store)
        for where in (QuarantineFilter(), QuarantineFilter(root="/data/a"),
                      QuarantineFilter(policy="strict", max_distance=3),
                      QuarantineFilter(min_distance=2, since=1_700_000_000 + 50 * 3600,
                                       until=1_700_000_000 + 100 * 3600),
                      filter_from({"root": "/data/b", "dmin": "0", "dmax": "0"}),
                      filter_from({"flag": "transform"}),
                      QuarantineFilter(flag="low_information", root="/data/a")):
            want = sorted((i for i, e in ids.items() if where.matches(e)), reverse=True)
            assert want  # every filter here matches some
            if where.flag:  # and a flag only entries that have it
                assert all(ids[i].transform if where.flag == "transform"
                           else ids[i].low_information for i in want)
            seen, page = [], review.page(where, limit=20)
            pages = [page]
            while True:
                seen += [r.entry.id for r in page.rows]
                assert page.total == len(want)
                if page.older is None:
                    break
                page = review.page(where, before=page.older, limit=20)
                pages.append(page)
            assert seen == want, where
            back = []  # and back again from the last page
            while page.newer is not None:
                page = review.page(where, after=page.newer, limit=20)
                back = [r.entry.id for r in page.rows] + back
            assert back == want[:len(back)] and len(back) + len(pages[-1].rows) == len(want)
        for bad in ({"since": "yesterday"}, {"flag": "transform IS NULL OR 1"}):
            with pytest.raises(ValueError):
                filter_from(bad)
    finally:
        store.close()


def test_with_status_newest_first_and_counted(store_url: str) -> None:
    from dedupd.store import ImageRecord
    from dedupd.store.base import UNRESOLVED

    store = open_store(store_url)
    try:
        ids = store.insert_many([ImageRecord(
            scope="s", path=f"/d/{i}.jpg", recipe="dhash:8:fast:area:v1", hash=i,
            digest=f"{i:064x}", file_size=1, mtime_ns=1, width=8, height=8,
            status=UNRESOLVED if i % 3 == 0 else "kept") for i in range(30)])
        records, count = store.with_status(UNRESOLVED, 4)
        assert count == 10
        assert [r.id for r in records] == sorted(ids[::3], reverse=True)[:4]
        assert all(r.status == UNRESOLVED for r in records)
        assert store.with_status("allowed", 5) == ([], 0)
    finally:
        store.close()


# ---------------------------------------------------------------- in a real browser


def _chrome(tmp: Path):  # type: ignore[no-untyped-def]
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install "
                    "chromium chromium-driver; ./dev test does it as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                 f"--user-data-dir={tempfile.mkdtemp(dir=tmp)}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_browser_restores_a_pair_by_clicking(site: Site, server: Server, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser = _chrome(tmp_path)
    try:
        browser.get(server.url)
        pairs = browser.find_elements(By.CSS_SELECTOR, "li.pair")
        assert len(pairs) == 5 == len([e for e in site.entries() if e.state == DONE])
        images = browser.find_elements(By.CSS_SELECTOR, "li.pair img")
        assert len(images) == 10
        for img in images:  # every thumbnail decoded in the browser
            wait_for(lambda img=img: img.get_property("naturalWidth"), 30, "a thumbnail")
        shot = tmp_path / "review.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        victim = next(e for e in site.entries() if e.state == DONE and e.distance > 0)
        browser.find_element(By.CSS_SELECTOR, f"button[value='restore:{victim.id}']").click()
        wait_for(lambda: not browser.find_elements(By.ID, f"entry-{victim.id}"), 30,
                 "the restored pair to leave the page")
        assert f"{victim.id}: restored {victim.original_path}" in \
            browser.find_element(By.CSS_SELECTOR, ".messages").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "li.pair")) == 4
    finally:
        browser.quit()
    assert Path(victim.original_path).exists() and not Path(victim.quarantine_path).exists()
    assert site.entry(victim.id).state == RESTORED
    [event] = server.events("restored")
    assert event["path"] == victim.original_path
    assert event["message_id"] == "9e19c9ec7390403ebd2deae89b7f4d06"


def quarantine_flagged(site: Site) -> tuple[QuarantineEntry, QuarantineEntry]:
    """A real daemon with `match_flips_rotations: true` quarantines a mirror image of a
    kept photo and a byte-identical copy of a flat grey image: the flags on their
    journal entries (transform, low_information) come from detection itself."""
    from conftest import write_image

    body = yaml.safe_load(site.config.read_text())
    body["policies"]["default"]["match_flips_rotations"] = True
    write_config(site.config, body)
    mirrored, grey, grey_copy = (site.root / n for n in
                                 ("coffee-mirrored.jpg", "grey.png", "grey-copy.png"))
    daemon = DaemonProcess(site.config, site.tmp / "daemon-flags.log",
                           env={"XDG_STATE_HOME": str(site.tmp / "xdg")}).start()
    try:
        kept = cv2.imread(str(site.root / "coffee.jpg"))
        write_image(mirrored, np.ascontiguousarray(kept[:, ::-1]))
        write_image(grey, np.full((300, 400, 3), 128, np.uint8))
        wait_for(lambda: "grey.png: accepted" in daemon.log_since_start(), 60, "grey kept")
        shutil.copyfile(grey, grey_copy)
        wait_for(lambda: not mirrored.exists() and not grey_copy.exists(), 60,
                 "the mirror image and the grey copy quarantined")
    finally:
        assert daemon.stop() == 0
    by_path = {e.original_path: e for e in site.entries()}
    flipped, flat = by_path[str(mirrored)], by_path[str(grey_copy)]
    assert (flipped.state, flipped.matched_path) == (DONE, str(site.root / "coffee.jpg"))
    assert (flipped.transform, flipped.low_information) == ("hflip", False)
    assert (flat.state, flat.matched_path, flat.distance) == (DONE, str(grey), 0)
    assert (flat.transform, flat.low_information) == (None, True)
    return flipped, flat


def test_browser_shows_and_filters_the_flags(site: Site, server: Server,
                                             tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    flipped, flat = quarantine_flagged(site)
    browser = _chrome(tmp_path)

    def listed() -> list[str] | None:
        try:  # the old page's elements go stale while the new one loads
            return [e.get_attribute("data-id") for e in
                    browser.find_elements(By.CSS_SELECTOR, "li.pair")]
        except StaleElementReferenceException:
            return None

    try:
        browser.get(server.url)
        assert len(browser.find_elements(By.CSS_SELECTOR, "li.pair")) == 7
        flag = browser.find_element(By.CSS_SELECTOR, f"#entry-{flipped.id} .flag.transform")
        assert flag.text == "hflip" and flag.is_displayed()
        low = browser.find_element(By.CSS_SELECTOR, f"#entry-{flat.id} .flag.low-information")
        assert low.text == "low information" and low.is_displayed()
        assert len(browser.find_elements(By.CSS_SELECTOR, ".flag.transform")) == 1
        assert len(browser.find_elements(By.CSS_SELECTOR, ".flag.low-information")) == 1
        for img in browser.find_elements(By.CSS_SELECTOR, "li.pair img"):
            wait_for(lambda img=img: img.get_property("naturalWidth"), 30, "a thumbnail")
        shot = Path(os.environ.get("DEDUPD_REVIEW_SCREENSHOT") or tmp_path / "review.png")
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        for value, want in (("transform", flipped), ("low_information", flat)):
            Select(browser.find_element(By.NAME, "flag")).select_by_value(value)
            browser.find_element(By.CSS_SELECTOR, ".filters button[type=submit]").click()
            wait_for(lambda want=want: listed() == [str(want.id)], 30, f"only the {value} entry")
            assert f"flag={value}" in browser.current_url
            browser.get(f"{server.url}?flag={value}")  # the same, typed as a URL
            wait_for(lambda want=want: listed() == [str(want.id)], 30, f"{value} by URL")
    finally:
        browser.quit()
    # The static gallery shows them too.
    out = tmp_path / "gallery"
    gallery(site, out)
    html = (out / "index.html").read_text()
    assert html.count('class="flag transform"') == 1 and ">hflip</span>" in html
    assert html.count('class="flag low-information"') == 1


def test_gallery_takes_the_live_pages_filters(site: Site, tmp_path: Path) -> None:
    """`review --html` has an option for each filter of the live page, --flag included,
    each in --help; a bad value, or a filter without --html, is a one-line usage error
    (exit 2; JSON under --json)."""
    flipped, flat = quarantine_flagged(site)
    done = [e for e in site.entries() if e.state == DONE]
    for options, want in ((("--flag", "transform"), [flipped]),
                          (("--flag", "low_information"), [flat]),
                          (("--flag", "low_information", "--min-distance", "1"), []),
                          (("--max-distance", "0"), [e for e in done if e.distance == 0])):
        out = tmp_path / "".join(options)
        assert gallery(site, out, *options)["entries"] == len(want), options
        html = (out / "index.html").read_bytes()
        assert pair_ids(html) == sorted((e.id for e in want), reverse=True), options
    assert len([e for e in done if e.distance == 0]) == 3  # rocket, grey copies; hflip too
    helped = review_cli(site, "--help").stdout
    for text in ("--flag transform|low_information", "(?flag=)", "--root DIR", "(?root=)",
                 "--policy NAME", "--min-distance N", "(?dmin=)", "--max-distance N",
                 "(?dmax=)", "--since YYYY-MM-DD", "--until YYYY-MM-DD", "(?until=)"):
        assert text in helped, text
    for options, said in (
            (("--flag", "mirrored"), "argument --flag: 'mirrored' is not a flag"),
            (("--since", "yesterday"), "argument --since: 'yesterday' is not a day"),
            (("--flag", "transform", "--html"), "argument --html: expected one argument")):
        plain = review_cli(site, "--html", str(tmp_path / "bad"), *options, check=2)
        assert plain.stdout == "" and plain.stderr.startswith(f"dedupd: {said}"), plain.stderr
        assert len(plain.stderr.splitlines()) == 1, plain.stderr
    for options in (("--flag", "transform"), ("--limit", "3", "--root", str(site.root))):
        run = review_cli(site, *options, check=2)
        assert len(run.stderr.splitlines()) == 1 and "only with --html" in run.stderr
    as_json = review_cli(site, "--json", "--html", str(tmp_path / "bad"), "--flag",
                         "mirrored", check=2)
    error = json.loads(as_json.stdout)
    assert (error["error"], error["exit_status"]) == ("usage", 2) and as_json.stderr == ""
    assert "'mirrored' is not a flag" in error["message"]
    assert not (tmp_path / "bad").exists()


def test_a_pending_duplicate_beyond_the_threshold_is_shown_beside_its_copy(
        tmp_path: Path) -> None:
    """A copy 5 bits from the kept image, confirmed by the strict second look (beyond
    max_distance: 4, within the lookup radius), whose quarantine fails: `quarantine list
    --pending` and the review's pending rows name the copy it duplicates and the real
    distance, as the pipeline found it (they searched only within max_distance)."""
    root = tmp_path / "photos"
    write_image(root / "a.jpg", photo(7))
    write_image(root / "b.jpg", cv2.convertScaleAbs(photo(7), alpha=1.2))
    os.utime(root / "a.jpg", (1_000_000_000, 1_000_000_000))  # a arrived first
    (tmp_path / "not-a-dir").write_bytes(b"")  # the quarantine cannot be made
    cfg = tmp_path / "dedupd.yaml"
    db = tmp_path / "state" / "index.sqlite"
    write_config(cfg, {"index": str(db), "quarantine_dir": str(tmp_path / "not-a-dir" / "q"),
                       "watches": [{"path": str(root)}]})
    scan = subprocess.run([sys.executable, "-m", "dedupd", "--config", str(cfg), "scan",
                           "--json", str(root)], capture_output=True, text=True, timeout=120)
    assert json.loads(scan.stdout)["duplicates"] == 1, scan.stdout + scan.stderr
    listed = subprocess.run([sys.executable, "-m", "dedupd", "--config", str(cfg),
                             "quarantine", "list", "--pending", "--json"],
                            capture_output=True, text=True, timeout=60)
    assert [(r["path"], r["matched_path"], r["distance"]) for r in json.loads(listed.stdout)] \
        == [(str(root / "b.jpg"), str(root / "a.jpg"), 5)], listed.stderr
    store = open_store(str(db))
    try:
        rows, total = Review(load_config(cfg), store).pending()
        assert total == 1 and [(r.record.path, r.kept.path, r.distance) for r in rows] == \
            [(str(root / "b.jpg"), str(root / "a.jpg"), 5)]
    finally:
        store.close()
