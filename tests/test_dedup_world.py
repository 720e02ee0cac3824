"""An unchanged re-run of a real (emulated) Qubes backup re-stores almost nothing.

The second `qtb-pipe backup --full` of an unchanged world is a real re-run (without --full the
unchanged qubes would be skipped): new backup-id, new tar timestamps, fresh pax headers, one
qvm-backup per qube. Each of those units starts with its own new `backup-header` and `qubes.xml`:
restic keeps a unit's stream in one file, so that costs restic the unit's first content-defined
chunk (0.5-8 MiB before compression, ~1 MiB typical; docs/adapters.md "Measured"), a fixed cost
per unit, not per byte. borg's import-tar chunks each member on its own and pays only kilobytes.
qubes.tarwriter (LVM thin, the default install) puts its pid into each volume's first header, and
every member's shim tag (its last 32 bytes) changes with it; unsplit, that cost borg the first and
the last chunk of such members every run (benchmarks/results/2026-12-02, "Inner formats"). Split
members (docs/adapters.md "borg: split members", the default) keep both in small items of their
own: a few kB per volume. Both formats are checked."""

from __future__ import annotations

import pytest
from drivertools import qtb_json, setup_qtb
from simtools import make_world

PERCENT_OF_STREAM = {"restic": 0.1, "borg": 0.1}
PER_UNIT_BYTES = {"restic": 2 * 2**20, "borg": 64 * 2**10}  # the fixed cost of one qvm-backup
PER_TARWRITER_VOLUME_BYTES = {"restic": 0, "borg": 16 * 2**10}  # the pid in its first header: 4 KiB
POOLS = {"lvm": "vm-pool", "file": "varlibqubes"}


def repo_bytes(path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "pool"), [("restic", "lvm"), ("borg", "lvm"), ("borg", "file")])
def test_unchanged_rerun_grows_repository_by_almost_nothing(tmp_path, engine: str, pool: str):
    world = make_world(tmp_path / "big", "--size-mib", "360", "--seed", "21", "--pool", POOLS[pool])
    repo = world.qube_home("backup") / "repo"
    setup_qtb(world, engine, repo)
    first = qtb_json(world, "backup")
    assert first["stream_bytes"] >= 200 * 2**20
    before = repo_bytes(repo)
    second = qtb_json(world, "backup", "--full")  # every qube again: a re-run of unchanged data
    growth = repo_bytes(repo) - before
    units = len(second["snapshots"])
    assert units == len(first["snapshots"]) >= 4
    backed_up = [q for q in first["qubes"] if q != "dom0"]
    images = [f for q in backed_up for f in (world.dom0 / "var/lib/qubes").glob(f"*/{q}/*.img")]
    volumes = len(images) if pool == "lvm" else 0
    allowed = (
        PERCENT_OF_STREAM[engine] / 100 * second["stream_bytes"]
        + units * PER_UNIT_BYTES[engine]
        + volumes * PER_TARWRITER_VOLUME_BYTES[engine]
    )
    print(
        f"{engine}, {pool} pool: unchanged re-run of a {second['stream_bytes'] / 2**20:.0f} MiB stream "
        f"in {units} units added {growth} bytes ({growth / units:.0f} per unit; allowed {allowed:.0f})"
    )
    assert growth <= allowed, f"{engine} grew {growth} bytes"
    # what a night really runs: on LVM thin only dom0's home (it has no volume revisions) goes again;
    # a file pool has no revisions to tell an unchanged qube by (facts §8), so everything goes again
    nightly = qtb_json(world, "backup")
    backed_up = [q for q, entry in nightly["qubes"].items() if entry["status"] == "backed up"]
    if pool == "lvm":
        assert backed_up == ["dom0"] and nightly["stream_bytes"] < 2**20
    else:
        assert set(backed_up) == set(first["qubes"])
        assert all(e["why"].startswith("always backed up") for e in nightly["qubes"].values())
