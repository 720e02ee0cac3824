"""`make demo` is one of the README's two commands: its whole path, on the small world and both
engines (slow tier; `make demo` itself runs the 400 MiB world)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from simtools import VENV_BIN


@pytest.mark.slow
def test_the_demo_runs_its_whole_story(tmp_path: Path):
    work = str(tmp_path / "demo")
    argv = [str(VENV_BIN / "qubes-sim"), "demo", "--profile", "small", "--dir", work, "--json"]
    done = subprocess.run(argv, capture_output=True, timeout=1800)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(done.stdout)
    assert set(report["engines"]) == {"restic", "borg"}
    for engine, r in report["engines"].items():
        # the night reads only the two qubes that ran, and dom0's home; verify covers every qube
        assert sorted(r["backed_up_at_night"]) == ["dom0", "vault", "work"], engine
        assert set(r["verify"]["qubes"]) == set(r["night"]["qubes"]) and r["restore_identical"], engine
