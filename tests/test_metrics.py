"""Prometheus metrics on real parts: a real daemon's endpoint and textfile, a real
`prometheus` server scraping it during a burst, and the alert rules under promtool."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from conftest import photo, write_image
from daemonproc import DaemonProcess, wait_for, write_config
from prometheus_client.parser import text_string_to_metric_families
from test_events import journal_entries, journald  # noqa: F401 - a fixture

from dedupd.config import ConfigError, parse_config
from dedupd.events import Event, add_listener, emit, remove_listener, setup_logging
from dedupd.metrics import LABEL_VALUES_MAX, Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
DECISIONS = ("image_accepted", "duplicate_quarantined", "duplicate_logged", "duplicate_deleted")
EVENT_LINE = re.compile(r"^dedupd: (?:<\w+> )?(\w+): ", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged(daemon: DaemonProcess) -> Counter[str]:
    """Events in the daemon's log (stderr lines), by kind."""
    return Counter(EVENT_LINE.findall(daemon.log_since_start()))


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return parse(text.decode())


def parse(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name
               and all(dict(lab).get(k) == want for k, want in labels.items()))


def burst(root: Path, unique: int, copies: int, corrupt: int, start: int = 0) -> dict[str, int]:
    """Write unique photos, byte copies of some and corrupt files; what should be decided."""
    for i in range(unique):
        write_image(root / f"u{start + i}.jpg", photo(start + i, 160, 120))
    for i in range(copies):
        shutil.copyfile(root / f"u{start + i}.jpg", root / f"c{start + i}.jpg")
    for i in range(corrupt):
        (root / f"bad{start + i}.jpg").write_bytes(b"not an image at all")
    return {"image_accepted": unique, "duplicate_quarantined": copies, "image_rejected": corrupt}


@pytest.fixture
def metered(tmp_path: Path):
    """A config with metrics on a free port and a textfile, and its root."""
    root = tmp_path / "root"
    root.mkdir()
    port = free_port()
    cfg = write_config(tmp_path / "dedupd.yaml", {
        "index": str(tmp_path / "state" / "index.sqlite"),
        "quarantine_dir": str(tmp_path / "state" / "quarantine"),
        "settle_seconds": 0.2, "watches": [{"path": str(root), "group": "photos"}],
        "metrics": {"listen": f"127.0.0.1:{port}", "textfile": str(tmp_path / "dedupd.prom")}})
    return cfg, root, port


def test_config_section(tmp_path: Path) -> None:
    c = parse_config({"metrics": {"listen": "[::1]:9468", "textfile": "m/dedupd.prom"}},
                     "x.yaml", tmp_path)
    assert c.metrics.listen == ("::1", 9468)
    assert c.metrics.textfile == tmp_path / "m" / "dedupd.prom"
    assert parse_config({}, "x.yaml").metrics.listen is None
    for bad, why in (({"listen": "9468"}, "not HOST:PORT"), ({"listen": "h:0"}, "not HOST"),
                     ({"listen": 9468}, "expected a string"), ({"port": 1}, "unknown key")):
        with pytest.raises(ConfigError, match=why) as err:
            parse_config({"metrics": bad}, "x.yaml")
        assert str(err.value).startswith("x.yaml: metrics.")


def test_endpoint_and_textfile_count_what_the_log_says(metered, tmp_path: Path) -> None:
    cfg, root, port = metered
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        want = burst(root, unique=12, copies=5, corrupt=2)
        wait_for(lambda: all(logged(daemon)[k] >= n for k, n in want.items()), 60,
                 f"the daemon to log {want}")
        samples = scrape(port)
        events = logged(daemon)
        for outcome in DECISIONS:
            assert total(samples, "dedupd_decisions_total", outcome=outcome, root=str(root),
                         group="photos") == events[outcome], outcome
        assert total(samples, "dedupd_rejections_total", reason="unsupported") == 2
        assert total(samples, "dedupd_decision_latency_seconds_count") == 19
        assert total(samples, "dedupd_hash_seconds_count") == 17  # the corrupt ones fail
        assert total(samples, "dedupd_indexed_images", group="photos") == 12
        assert total(samples, "dedupd_store_available") == 1
        assert total(samples, "dedupd_circuit_open", root=str(root)) == 0
        assert total(samples, "dedupd_files_queued_total") >= 19
        assert total(samples, "dedupd_last_reconcile_timestamp_seconds") > 1.7e9
        assert total(samples, "dedupd_log_events_dropped_total") == 0
        assert total(samples, "dedupd_log_journal_fallbacks_total") == 0
        assert not [n for (n, lab) in samples for k, v in lab if "/u" in v or ".jpg" in v]
    finally:
        assert daemon.stop() == 0
    # The textfile holds the final counts once the daemon stopped.
    final = parse((tmp_path / "dedupd.prom").read_text())
    assert total(final, "dedupd_decisions_total", outcome="duplicate_quarantined") == 5
    assert total(final, "dedupd_decisions_total", outcome="image_accepted") == 12


def test_metrics_failures_do_not_stop_the_daemon(metered, tmp_path: Path) -> None:
    cfg, root, port = metered
    body = json.loads(json.dumps(__import__("yaml").safe_load(cfg.read_text())))
    body["metrics"]["textfile"] = str(tmp_path / "no" / "such" / "dir" / "dedupd.prom")
    write_config(cfg, body)
    with socket.socket() as taken:  # the port is someone else's
        taken.bind(("127.0.0.1", port))
        taken.listen()
        daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        try:
            want = burst(root, unique=3, copies=1, corrupt=0)
            wait_for(lambda: all(logged(daemon)[k] >= n for k, n in want.items()), 60,
                     "decisions despite broken metrics")
            log = daemon.log_since_start()
            assert "metrics: cannot listen on 127.0.0.1" in log
            assert log.count("cannot write the textfile") == 1  # once, not every 10 s
        finally:
            assert daemon.stop() == 0


def test_a_failing_listener_never_breaks_logging(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("stderr", "info")

    def broken(event: Event, fields: dict) -> None:
        raise RuntimeError("boom")

    add_listener(broken)
    try:
        emit(Event.IMAGE_ACCEPTED, "x: accepted", path="/x")
    finally:
        remove_listener(broken)
    assert "image_accepted: x: accepted" in capsys.readouterr().err


def test_reload_applies_a_new_textfile_and_warns_about_listen(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    root = tmp_path / "root"
    before = parse_config({"watches": [str(root)]}, "x.yaml")
    metrics = Metrics(before)
    metrics.start()
    try:
        after = parse_config({"watches": [str(root)], "metrics": {
            "textfile": str(tmp_path / "m.prom"), "listen": "127.0.0.1:9"}}, "x.yaml")
        with caplog.at_level("WARNING", logger="dedupd.metrics"):
            metrics.configure(after)
        assert "takes effect when dedupd restarts" in caplog.text
        wait_for(lambda: (tmp_path / "m.prom").exists(), 10, "the textfile")
        assert "dedupd_decisions_total" in (tmp_path / "m.prom").read_text()
    finally:
        metrics.stop()


def test_labels_stay_bounded(tmp_path: Path) -> None:
    tmp_path = tmp_path / "root"
    config = parse_config({"watches": [str(tmp_path)]}, "x.yaml")
    metrics = Metrics(config)
    for i in range(3 * LABEL_VALUES_MAX):
        metrics.on_event(Event.IMAGE_REJECTED, {"path": str(tmp_path / f"f{i}"),
                                                "kind": f"kind{i}", "root": str(tmp_path)})
        metrics.on_event(Event.IMAGE_ACCEPTED, {"path": f"/elsewhere/{i}.jpg"})
    samples = parse(__import__("prometheus_client").generate_latest(metrics.registry).decode())
    reasons = {dict(lab)["reason"] for (n, lab) in samples if n == "dedupd_rejections_total"}
    assert len(reasons) == LABEL_VALUES_MAX + 1 and "other" in reasons
    assert total(samples, "dedupd_rejections_total", reason="other") == 2 * LABEL_VALUES_MAX
    roots = {dict(lab)["root"] for (n, lab) in samples if n == "dedupd_decisions_total"}
    assert roots == {str(tmp_path), ""}  # never an image's path


# ---------------------------------------------------------------- Prometheus itself


def _prometheus_or_skip() -> str:
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus; ./dev test "
                    "does it as root)")
    return exe


def _promql(port: int, query: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def journal_counts(root: Path) -> Counter[str]:
    """Events about root in the real journal, by kind."""
    return Counter(e["DEDUPD_EVENT"] for e in journal_entries("DEDUPD_ROOT", str(root)))


@pytest.mark.usefixtures("journald")
def test_prometheus_scrapes_a_burst_and_agrees_with_the_journal(metered, tmp_path: Path
                                                                ) -> None:
    exe = _prometheus_or_skip()
    cfg, root, port = metered
    prom_port = free_port()
    prom_cfg = write_config(tmp_path / "prometheus.yml", {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "dedupd-alerts.yml")],
        "scrape_configs": [{"job_name": "dedupd",
                            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]})
    with open(tmp_path / "daemon.log", "wb") as dlog:
        daemon = subprocess.Popen([sys.executable, "-m", "dedupd", "--config", str(cfg),
                                   "--log", "journald", "run"], stdout=dlog, stderr=dlog)
    with open(tmp_path / "prometheus.log", "wb") as plog:
        prom = subprocess.Popen(
            [exe, f"--config.file={prom_cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=plog, stderr=plog)
    try:
        wait_for(lambda: _up(prom_port), 60, "prometheus to scrape the daemon")
        want: Counter[str] = Counter()
        for wave in range(4):  # a burst in waves, so scrapes land in the middle of it
            want.update(burst(root, unique=25, copies=10, corrupt=2, start=100 * wave))
        try:
            wait_for(lambda: all(journal_counts(root)[k] >= n for k, n in want.items()), 120,
                     f"the daemon to log {dict(want)} to the journal")
        except AssertionError as exc:  # say what did arrive, and what the daemon said
            raise AssertionError(f"{exc}; the journal has {dict(journal_counts(root))}; "
                                 f"daemon: {(tmp_path / 'daemon.log').read_text()[-2000:]}"
                                 ) from None
        events = journal_counts(root)

        def agrees() -> bool:
            got = {r["metric"]["outcome"]: float(r["value"][1]) for r in _promql(
                prom_port, 'sum by (outcome) (dedupd_decisions_total{job="dedupd"})')}
            rejected = _promql(prom_port, "sum(dedupd_rejections_total)")
            return got == {o: float(events[o]) for o in DECISIONS} and rejected and \
                float(rejected[0]["value"][1]) == events["image_rejected"]

        wait_for(agrees, 60, "Prometheus's counts to equal the log's")
        assert events["duplicate_quarantined"] == 40 and events["image_accepted"] == 100
        samples = _promql(prom_port, 'count_over_time(dedupd_queue_depth{job="dedupd"}[5m])')
        assert float(samples[0]["value"][1]) >= 2  # scraped more than once meanwhile
        firing = _promql(prom_port, 'ALERTS{alertstate="firing"}')
        assert firing == [], firing
    finally:
        prom.terminate()
        prom.wait(30)
        daemon.terminate()
        assert daemon.wait(30) == 0


def _up(port: int) -> bool:
    try:
        return any(r["value"][1] == "1" for r in _promql(port, 'up{job="dedupd"}'))
    except OSError:
        return False


def test_alert_rules_check_and_unit_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    check = subprocess.run([promtool, "check", "rules", "dedupd-alerts.yml"], cwd=DEPLOY,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "6 rules found" in check.stdout
    test = subprocess.run([promtool, "test", "rules", "dedupd-alerts.test.yml"], cwd=DEPLOY,
                          capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr
