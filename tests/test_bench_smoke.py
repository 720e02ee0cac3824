"""`make bench-smoke`: the benchmark's own code path on a tiny workload, so it never rots.
Nothing here asserts timings; it checks that every configuration ran and reported sane figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_smoke_produces_complete_results(tmp_path: Path):
    out = tmp_path / "results"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out), "--work", str(tmp_path)],
        check=True,
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        # a guard against a hang, not a timing: the smoke runs every benchmark (the nights on 5 and
        # 7 qubes, formats, load) and took ~20 min on a loaded 2-core runner beside the slow tier
        timeout=2700,
    )
    data = json.loads((out / "results.json").read_text())
    configs = {s["config"] for s in data["steps"]}
    assert {
        "stock",
        "qtb+restic",
        "qtb+borg",
        "qtb+borg-create",
        "direct restic --stdin",
        "direct borg create -",
        "raw files restic",
        "raw files borg",
    } <= configs
    for s in data["steps"]:
        assert s["seconds"] > 0
    for name in ("qtb+restic", "qtb+borg", "qtb+borg-create"):
        r = data["ratios"][name]
        assert r["repo_after_3_bytes"] > 0 and "restore_vs_engine_dump" in r and "speed_vs_stock_full" in r
    assert {r["tool"] for r in data["shim"]} >= {"shim", "cat"}
    assert len(data["memory_two_sizes"]) == 2
    for sizes in data["memory_two_sizes"].values():
        assert {"qtb-pipe", "qtb-adapter", "shim"} <= set(sizes)
    quarter = {(s["config"], s["step"]) for s in data["quarter_size_steps"]}
    assert {
        (c, "full") for c in ("qtb+restic", "qtb+borg", "direct restic --stdin", "direct borg create -")
    } <= quarter
    for config in ("qtb+restic", "qtb+borg"):
        assert {(config, "restore (1 pass)"), (config, "engine dump (via adapter)")} <= quarter
    assert set(data["marginal"]) == {"qtb+restic", "qtb+borg"}  # its figures are noise at this size
    for engine, night in data["typical_night"].items():  # the night backs up only what ran
        assert set(night["nightly"]["backed_up"]) == {"work", "vault", "dom0"}, engine
        assert 0 < night["nightly"]["bytes_read"] < night["full_same_state"]["bytes_read"], engine
        small_own, small_whole = night["restore_small_own_copy"], night["restore_small_whole_system"]
        assert 0 < small_own["bytes_read"] < small_whole["bytes_read"], engine
    assert set(data["typical_night"]) == {"restic", "borg"}
    for engine, night in data["typical_night_30_qubes"].items():  # the smoke's 2 more AppVMs: 7 units
        assert night["full_same_state"]["units"] == 7 and "app-1" not in night["nightly"]["backed_up"], engine
        assert night["full_same_state"]["units"] > data["typical_night"][engine]["full_same_state"]["units"]
    from benchmarks.formats import POOLS

    assert set(data["inner_formats"]) == set(POOLS)  # both inner formats, both engines, three steps
    for engines in data["inner_formats"].values():
        assert set(engines) == {"restic", "borg"}
        for row in engines.values():
            assert set(row) == {"full", "unchanged", "changed 2%"} and row["full"]["stream_bytes"] > 0
    for engine, load in data["many_nights"].items():
        assert load["engine"] == engine and len(load["nights"]) == 3
    stress = data["shim_plan_stress"]
    assert stress["chunks"] == 200 and stress["first_chunk_s"] > 0 and stress["last_chunk_s"] > 0
    text = (out / "results.md").read_text()
    assert "Inner formats" in text and "a restore plan of 200 chunks" in text
    assert "Per-byte speed" in (out / "results.md").read_text()
    assert (out / "results.md").stat().st_size > 0
    assert (out / "throughput.png").stat().st_size > 0 and (out / "repository-size.png").stat().st_size > 0


def test_bench_size_flag_takes_units_and_refuses_nonsense():
    repo = Path(__file__).parent.parent
    sizes = "print([parse_size(t) for t in ('512M', '1G', '1.5g', '2048')])"
    done = subprocess.run(
        [sys.executable, "-c", f"from benchmarks.run import parse_size; {sizes}"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "[512.0, 1024.0, 1536.0, 2048.0]"
    for bad in ("3x", "4K", "0.001G", "-1G"):
        refused = subprocess.run(
            [sys.executable, "-m", "benchmarks.run", "--size", bad], cwd=repo, capture_output=True, text=True
        )
        assert refused.returncode == 2 and "--size" in refused.stderr.splitlines()[-1]
