"""The daemon's scheduler of small periodic tasks, on its own (a clock we move)."""

from __future__ import annotations

from dedupd.daemon.periodic import Periodic


def test_tasks_run_when_due_in_order_and_an_interval_of_zero_is_off() -> None:
    now = [0.0]
    tasks = Periodic(lambda: now[0])
    ran: list[str] = []
    interval = [3.0]
    tasks.every(1.0, lambda: ran.append("a"), name="a")
    tasks.every(lambda: interval[0], lambda: ran.append("b"), name="b")
    tasks.every(0, lambda: ran.append("off"), name="off")
    assert tasks.run_due() == []
    now[0] = 1.0
    assert tasks.run_due() == ["a"]
    now[0] = 3.0
    assert tasks.run_due() == ["a", "b"]
    interval[0] = 0.5  # read afresh each time (a reload changes it)
    now[0] = 3.5
    assert tasks.run_due() == ["b"]
    assert "off" not in ran


def test_early_runs_a_task_before_its_time_and_a_slow_task_restarts_its_timer() -> None:
    now = [0.0]
    tasks = Periodic(lambda: now[0])
    idle = [False]

    def slow() -> None:
        now[0] += 4.0  # e.g. a store ping that waits for its timeout

    tasks.every(30.0, lambda: None, name="trim", early=lambda: idle[0])
    tasks.every(5.0, slow, name="ping")
    now[0] = 1.0
    assert tasks.run_due() == []
    idle[0] = True
    assert tasks.run_due() == ["trim"]
    idle[0] = False
    now[0] = 5.0
    assert tasks.run_due() == ["ping"]  # finished at 9.0
    now[0] = 12.0
    assert tasks.run_due() == []  # 3 s after it finished, not 7 s after it started
    now[0] = 14.0
    assert tasks.run_due() == ["ping"]
