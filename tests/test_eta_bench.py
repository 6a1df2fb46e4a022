"""The ETA evaluation harness (bench/eta.py) runs in quick mode and reports.

It checks that the harness works and what it reports, not that the estimator
meets its goal: that is what the full run is for.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILES = {"constant", "slowing", "speeding", "bursty", "multistage", "stall"}
METHODS = {"headway", "naive", "tqdm"}
CELLS = {"10", "25", "50", "75", "90", "all"}
HISTORY_PROFILES = {"misweighted", "faster-machine", "shifted-shares"}
HISTORY_METHODS = {"headway", "no-history", "naive", "tqdm"}


def test_quick_harness_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "eta.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "eta.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("profile"))
    for column in ("10%", "25%", "50%", "75%", "90%", "all"):
        assert column in header
    rows = {line.split()[0] for line in lines if line and line.split()[0] in PROFILES}
    assert rows == PROFILES
    assert any(line.startswith("overall") for line in lines)
    assert "Spearman" in done.stdout
    assert "goal:" in done.stdout

    results = json.loads(out.read_text())
    assert results["mode"] == "quick"
    table = results["mdape_percent"]
    assert set(table) == PROFILES | {"overall"}
    for row in table.values():
        assert set(row) == METHODS
        for cells in row.values():
            assert set(cells) == CELLS
            assert all(v is None or (math.isfinite(v) and v >= 0) for v in cells.values())
    assert all(table["overall"][m]["all"] is not None for m in METHODS)
    correlation = results["spearman_confidence_error"]
    assert isinstance(correlation, float) and -1.0 <= correlation <= 1.0
    assert set(results["goal"]) == {"error_met", "correlation_met", "history_met", "met"}

    # The history profiles (issue 14): their own table, with and without history.
    history_rows = {
        line.split()[0] for line in lines if line and line.split()[0] in HISTORY_PROFILES
    }
    assert history_rows == HISTORY_PROFILES
    assert "no-history" in done.stdout
    history = results["history"]
    assert set(history["mdape_percent"]) == HISTORY_PROFILES
    for row in history["mdape_percent"].values():
        assert set(row) == HISTORY_METHODS
        for cells in row.values():
            assert set(cells) == CELLS | {"early"}
    goals = history["goals"]
    assert set(goals) == {"misweighted", "faster-machine"}
    assert goals["misweighted"]["goal"] == 0.5 and goals["faster-machine"]["goal"] == 1.1
    for goal in goals.values():
        assert goal["ratio"] > 0 and isinstance(goal["met"], bool)
        assert f"with history / without = {goal['ratio']:.2f}" in done.stdout
