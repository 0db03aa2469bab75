"""scripts/bench_replicas.py end to end, with tiny settings: its own PostgreSQL server, three
gateway replicas and a fake-worker process, all started and stopped by the script."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent


async def test_both_churn_layouts_cycle_without_errors_and_the_feed_latency_is_timed() -> None:
    command = [
        *(sys.executable, "scripts/bench_replicas.py", "--duration", "1", "--clients", "3"),
        *("--feed-samples", "5", "--routable-samples", "3", "--settle-timeout", "0"),
    ]
    with trio.fail_after(150):
        result = await trio.run_process(
            command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
    stderr = result.stderr.decode(errors="replace")
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1, (lines, stderr)
    line: dict[str, Any] = json.loads(lines[0])
    assert result.returncode == 0 and line["all_ok"], (line, stderr)
    assert line["benchmark"] == "bench_replicas" and line["cores"] >= 1
    assert "scripts/bench_replicas.py --duration 1" in line["command"]
    layouts = ("one_replica", "three_replicas")
    assert set(line["churn_cycles_per_sec"]) == set(layouts)
    for layout in layouts:
        assert line["churn_cycles_per_sec"][layout] > 0, line
        assert line["churn_failed_cycles"][layout] == 0
        assert line["churn_errors"][layout] == line["churn_unexpected"][layout] == {}
        assert line["churn_workers_left"][layout] == [0, 0, 0]
        runs = line["churn_runs"][layout]
        assert sum(run["clients"] for run in runs) == 3
        assert all(run["exit_code"] == 0 and run["cycles"] > 0 for run in runs), runs
    assert [run["replica"] for run in line["churn_runs"]["one_replica"]] == [0, 0, 0]
    assert [run["replica"] for run in line["churn_runs"]["three_replicas"]] == [0, 1, 2]
    event, routable = line["a_202_to_b_event_ms"], line["a_202_to_b_routable_ms"]
    assert event["samples"] == 5 and routable["samples"] == 3
    # B's event may be read just before A's 202 (a negative sample): only its order is sure
    assert event["p50"] <= event["p99"] <= event["max"]
    assert 0 < line["a_post_to_b_event_ms"]["p50"] <= line["a_post_to_b_event_ms"]["max"]
    assert 0 < routable["p50"] <= routable["p99"] <= routable["max"]  # detection on A: > 0
    assert line["a_delete_to_b_removed_ms"]["ready"]["samples"] == 3
    assert (line["feed_errors"], line["feed_unexpected"]) == ({}, {})
    parts = ("idle", "before_one_replica", "before_three_replicas", "before_feed", "after_feed")
    assert set(line["db_transactions_per_sec"]) == set(parts)
    assert all(rate >= 0 for rate in line["db_transactions_per_sec"].values())
    assert set(line["settle_seconds"]) == {"one_replica", "three_replicas", "feed"}
