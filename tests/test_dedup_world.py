"""An unchanged re-run of a real (emulated) Qubes backup re-stores almost nothing.

The second `qtb-pipe backup` of an unchanged world is a real re-run: new backup-id, new tar
timestamps, fresh pax headers. Figures for other workloads are in the benchmark."""

from __future__ import annotations

import pytest
from simtools import make_world
from test_driver import qtb_json, setup_qtb

LIMITS = {"restic": 0.5, "borg": 0.1}  # percent of the stream


def repo_bytes(path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("engine", ["restic", "borg"])
def test_unchanged_rerun_grows_repository_by_almost_nothing(tmp_path, engine: str):
    world = make_world(tmp_path / "big", "--size-mib", "360", "--seed", "21")
    repo = world.qube_home("backup") / "repo"
    setup_qtb(world, engine, repo)
    first = qtb_json(world, "backup")
    assert first["stream_bytes"] >= 200 * 2**20
    before = repo_bytes(repo)
    second = qtb_json(world, "backup")
    growth = repo_bytes(repo) - before
    percent = 100 * growth / second["stream_bytes"]
    print(
        f"{engine}: unchanged re-run of a {second['stream_bytes'] / 2**20:.0f} MiB stream added "
        f"{growth} bytes ({percent:.3f}%)"
    )
    assert percent <= LIMITS[engine], f"{engine} grew {percent:.3f}% of the stream"
