"""Thirty nights in a row (issue 14), through benchmarks/load.py: what each night backed up, that
retention kept every qube's newest copy, that verify and a restore of every kept snapshot still
work. Its timings go to `make bench`, never into an assertion here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the benchmarks package
from benchmarks.load import RAN, growth, many_nights


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["restic", "borg"])
def test_thirty_nights_then_prune_check_verify_restore(tmp_path, engine: str):
    result = many_nights(tmp_path / engine, dict(os.environ), engine, nights=30, size_mib=8)
    rows = result["nights"]
    assert [r["backed_up"] for r in rows] == [sorted({"dom0", RAN[n % len(RAN)]}) for n in range(30)]
    assert rows[-1]["snapshots"] == len(result["first_backup"]["qubes"]) + 2 * 30  # one per unit
    # default retention, all on one day: each qube keeps its newest copy, nothing else survives
    assert (
        result["prune"]["kept"] == result["after_prune"]["snapshots"] == len(result["first_backup"]["qubes"])
    )
    assert result["verify"]["qubes"] and all(result["verify"]["qubes"].values())
    restored = result["restore_every_qube"]  # every kept snapshot, each qube as it was backed up
    assert restored["ok"] and restored["snapshots"] == result["prune"]["kept"]
    assert set(restored["identical"]) == set(result["first_backup"]["qubes"])
    assert all(restored["identical"].values()), restored["identical"]
    print(
        f"{engine}: growth over 30 nights (last 5 / first 5): backup {growth(rows, 'backup_seconds')}, "
        f"list {growth(rows, 'list_seconds')}, prune --dry-run {growth(rows, 'prune_dry_run_seconds')}, "
        f"verify {growth(rows, 'verify_night_seconds')}, dom0 state {growth(rows, 'dom0_state_bytes')}"
    )
