"""The benchmark suite (bench/run.py) runs in quick mode and writes its results.

It checks that the suite works and what it reports, never a threshold on a
time or a ratio: those are for the full run on a quiet machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {
    "ingest",
    "streamed_reports",
    "batched",
    "fanout",
    "slow_consumers",
    "memory",
    "admission",
    "scaling",
    "unrelated_watchers",
    "sse",
    "dashboard",
}
# A section either ran or found the RPC it measures not implemented yet.
DONE = {"ok", "not implemented"}
# The dashboard section drives Debian's Chromium: CI's `make test` installs it
# (as the browser tests need), so there it must run; elsewhere, without it,
# the section skips and says why.
CHROMIUM = Path(os.environ.get("HEADWAY_CHROMIUM", "/usr/bin/chromium"))
DASHBOARD_MAY_SKIP = not CHROMIUM.exists() and os.environ.get("CI") != "true"


@pytest.mark.timeout(165)
def test_quick_suite_writes_json_and_a_markdown_table(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=135,  # the suite's own watchdog stops it at 120 s
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["mode"] == "quick"
    machine = results["machine"]
    for key in ("cores", "python", "grpcio"):
        assert machine[key]
    sections = results["sections"]
    assert set(sections) == SECTIONS
    for name, section in sections.items():
        if name == "dashboard" and DASHBOARD_MAY_SKIP:
            assert section["status"] in DONE or section["status"].startswith("skipped: no Chromium")
            continue
        assert section["status"] in DONE, (name, section["status"])

    ingest = sections["ingest"]["runs"]
    assert set(ingest) == {"32", "64"}
    for run in ingest.values():
        assert run["headway"]["calls"] > 0 and run["bare"]["calls"] > 0
        assert run["ratio"] > 0
    batched = sections["batched"]
    assert set(batched["batches"]) == {"1", "10", "100", "1000"}
    for run in (batched["unary"], *(b["headway"] for b in batched["batches"].values())):
        assert run["reports"] > 0 and run["server_cpu_us_per_item"] > 0
    # Every ack was checked: none rejected, none a duplicate, no call failed.
    assert batched["reports_checked"] > 0
    assert batched["rejected"] == batched["not_applied"] == batched["failed_calls"] == 0
    assert set(batched["bare_batch_echo"]) == {"100", "1000"}
    fanout = sections["fanout"]
    for key in ("operation", "project", "bare", "operation_paced", "project_paced"):
        assert set(fanout[key]) == {"saturated", "half_rate"}
        assert fanout[key]["saturated"]["states_delivered_per_s"] > 0
        assert fanout[key]["saturated"]["producer_reports_per_s"] > 0
    for key in ("operation_paced", "project_paced"):
        for run in fanout[key].values():
            assert run["view_samples"] > 0
    assert set(fanout["paced_cpu_ratio"]) == {"operation", "project"}
    assert sections["admission"]["headway"]["streams"] > 0
    memory = sections["memory"]
    assert memory["idle_watchers"]["headway"]["watchers"] > 0
    assert memory["retained_operations"]["operations"] > 0
    scaling = sections["scaling"]
    assert set(scaling["ingest"]) == set(scaling["fanout"]) == {"1", "10"}
    unrelated = sections["unrelated_watchers"]
    assert set(unrelated["runs"]) == {"10", "200"}
    assert unrelated["bare_echo"]["reports"] > 0
    for run in unrelated["runs"].values():
        assert run["headway"]["reports"] > 0 and run["headway"]["server_cpu_us_per_item"] > 0
        # Every watcher was admitted and synced; none heard of the producer's operation.
        assert run["events"]["SYNCED"] == run["watchers"]
        assert run["events"].get("CHANGED", 0) == 0
    sse = sections["sse"]
    for kind in ("sse", "grpc"):
        # Every client of each kind opened, synced and received changes, and
        # none of their streams ended early (the producers' errors aside).
        assert sse["memory"][kind]["watchers"] == sse["clients"] > 0
        assert sse["memory"][kind]["bytes_per_watcher"] is not None
        for run in (sse["saturated"][kind], sse["same_rate"][kind]):
            assert run["readers"] == sse["clients"]
            assert run["states_delivered_per_s"] > 0 and run["latency_samples"] > 0
            assert not [e for e in run["errors"] if not e.startswith("producer ")], run["errors"]
    assert sse["saturated"]["ratio"] > 0 and sse["same_rate"]["p99_ratio"] is not None
    dashboard = sections["dashboard"]
    if dashboard["status"] == "ok":
        for kind in ("idle", "loaded"):
            run = dashboard[kind]
            # The page drew frames and measured its main thread, and kept a
            # screenful of rows in the DOM, not one per operation.
            assert run["frames"] > 0 and run["fps"] > 0 and run["frame_p99_ms"] > 0
            assert run["main_thread_cpu_pct"] is not None and run["heap_after_gc_bytes"] > 0
            assert 0 < run["rows"] < 100
        assert dashboard["idle"]["reports"] == 0 < dashboard["loaded"]["reports"]
        assert dashboard["fps_ratio"] > 0
        assert len(dashboard["catch_up_s"]) == dashboard["rounds"]
        # Every report the producers sent was applied.
        assert dashboard["acks"]["reports"] > 0
        assert dashboard["acks"]["rejected"] == dashboard["acks"]["not_applied"] == 0

    rows = results["table"]
    assert rows and all(
        set(row) == {"figure", "headway", "bare", "ratio", "goal", "met"} for row in rows
    )
    figures = [row["figure"] for row in rows]
    for size in ("1", "10", "100", "1000"):
        assert any(
            f.startswith(f"BatchUpdateOperations reports/s, batches of {size} ") for f in figures
        )
    assert sum("default pacing" in f for f in figures) >= 8 + 3  # fan-out and slow consumers
    assert any("rejected / not applied" in f for f in figures)
    for size in ("10", "200"):
        assert any(
            "CPU µs per report" in f and f" {size} WatchOperations watchers" in f for f in figures
        )
    assert any(f.startswith("Scaling: reports/s 1 producer paced at") for f in figures)
    assert sum(f.startswith("SSE: ") for f in figures) == 5
    if dashboard["status"] == "ok":
        assert sum(f.startswith("Dashboard: ") for f in figures) == 7
    else:
        assert any(f.startswith("Dashboard in a browser: skipped") for f in figures)
    markdown = (tmp_path / "results.md").read_text()
    assert "| figure | Headway | bare | ratio | goal | met? |" in markdown
    assert "| --- | --- | --- | --- | --- | --- |" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == len(rows) + 2  # header, separator, one line per figure
    assert machine["grpcio"] in markdown
    # The table is printed too.
    assert "| figure | Headway | bare | ratio | goal | met? |" in done.stdout
