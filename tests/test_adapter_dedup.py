"""An unchanged re-run stores almost nothing again: measured as repository sizes on disk.

"Unchanged" = the same member data in new outer tar archives, i.e. every pax atime/ctime and
ustar mtime differs (GNU tar with another --mtime and fresh files). restic must grow by at most
0.5% of the stream, borg (import-tar, the default) by at most 0.1%. The stream is ~30 MiB of
disk-image-like data in 4 MiB members (Qubes uses 100 MiB: more member boundaries per byte here,
so this is the harder case).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from conftest_remote import AdapterHome, directory_bytes
from streamtools import make_backup, write_stream

MIB = 1024 * 1024
VOLUMES = {"vm1/private.img": 12 * MIB, "vm2/private.img": 10 * MIB, "vm3/root.img": 8 * MIB}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dedup")
    backup = make_backup(31, volumes=VOLUMES, chunk_bytes=4 * MIB)
    first = write_stream(backup, tmp / "first", tmp / "work", mtime=1_700_000_000)
    second = write_stream(backup, tmp / "second", tmp / "work", mtime=1_700_086_400)
    assert first.path.read_bytes() != second.path.read_bytes()
    return backup, first, second


@pytest.mark.parametrize(
    ("engine", "settings", "limit"),
    [("restic", [], 0.005), ("borg", [], 0.001), ("borg", ["store_method=create"], 0.001)],
    ids=["restic", "borg-import-tar", "borg-create"],
)
def test_unchanged_rerun_grows_the_repository_very_little(
    engine, settings, limit, two_runs, tmp_path: Path
) -> None:
    backup, first, second = two_runs
    home = AdapterHome(tmp_path)
    repo = tmp_path / "repo"
    home.init(engine, str(repo), *settings)
    sizes = []
    for stream in (first, second):
        run = "run" + secrets.token_hex(6)
        home.ok("store", "--run", run, stdin=stream.path)
        home.ok("commit", "--run", run, stdin=backup.manifest(engine))
        sizes.append(directory_bytes(repo))
    growth = sizes[1] - sizes[0]
    print(f"\n{engine} {settings}: stream {first.size} B, first run {sizes[0]} B, re-run +{growth} B "
          f"({100 * growth / first.size:.3f}% of the stream)")  # fmt: skip
    assert growth <= limit * first.size
    assert len(home.snapshots()) == 2
