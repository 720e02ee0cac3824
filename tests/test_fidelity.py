"""qubes-sim against the facts: each behaviour the driver relies on, pinned to what the upstream code
does (../shared/qubes-backup-facts.md and docs/qubes-facts.md, which cite the upstream lines).

Where qubes-sim knowingly differs from Qubes, the test says so: tar2qfile and qfile-dom0-unpacker
are Python here (C upstream); LVM revision ids are kept one second apart (see qubes_sim/storage.py).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from drivertools import qtb, qtb_json
from simtools import Sim, make_world


def volume_info(world: Sim, spec: str, *prop: str) -> subprocess.CompletedProcess:
    return world.run("qvm-volume", "info", spec, *prop)


def revisions(world: Sim, spec: str) -> list[str]:
    return volume_info(world, spec, "revisions").stdout.decode().split()


def stop_after_running(world: Sim, qube: str) -> None:
    world.run("qvm-start", qube, check=True)
    world.run("qvm-shutdown", qube, check=True)


# --- §8: volumes, revisions, qvm-volume ---------------------------------------------------------------


def test_qvm_volume_info_prints_the_upstream_table(world: Sim):
    text = volume_info(world, "vault:private").stdout.decode()
    rows = [line.split()[0] for line in text.splitlines()[:11]]
    # qubesadmin/tools/qvm_volume.py info_volume: this order, values at column 19 (column -t)
    assert rows == ["pool", "vid", "rw", "source", "save_on_stop", "snap_on_start", "size", "usage",
                    "revisions_to_keep", "ephemeral", "is_outdated"]  # fmt: skip
    assert text.splitlines()[0] == "pool               vm-pool"
    assert text.splitlines()[-1] == "List of available revisions (for revert): none"
    assert volume_info(world, "vault:private", "revisions_to_keep").stdout == b"1\n"
    bad = [volume_info(world, "vault:nope"), volume_info(world, "nope:private"), volume_info(world, "vault")]
    assert [p.returncode for p in bad] == [1, 1, 2]
    assert bad[0].stderr == b"qvm-volume: error: vm 'vault' has no volume 'nope'\n"
    assert bad[1].stderr == b"qvm-volume: error: no vm 'nope'\n"


def test_lvm_revision_at_each_stop_of_a_qube_that_ran(world: Sim):
    assert revisions(world, "vault:private") == []
    world.run("qvm-shutdown", "vault", check=True)  # it never started: nothing to commit (lvm _commit)
    assert revisions(world, "vault:private") == []
    stop_after_running(world, "vault")
    (first,) = revisions(world, "vault:private")
    assert re.fullmatch(r"[0-9]{10}-back", first)  # <unix time of the commit>-back
    stop_after_running(world, "vault")  # every run -> stop adds one, written or not
    (second,) = revisions(world, "vault:private")  # revisions_to_keep = 1: the newest kept
    assert second != first
    text = volume_info(world, "vault:private").stdout.decode()
    assert text.endswith(f"List of available revisions (for revert):\n  {second}\n")


def test_templates_commit_root_and_private_appvms_private_only(world: Sim):
    stop_after_running(world, "debian-12")
    assert revisions(world, "debian-12:root") and revisions(world, "debian-12:private")
    assert volume_info(world, "work:root").returncode == 1  # an AppVM's root is not saved (snap_on_start)


@pytest.mark.parametrize(("pool", "pattern"), [("reflink", r"[0-9]+"), ("varlibqubes", r"old")])
def test_other_pools_revision_ids(tmp_path: Path, pool: str, pattern: str):
    world = make_world(tmp_path / "w", "--pool", pool)
    stop_after_running(world, "vault")
    stop_after_running(world, "vault")
    (revision,) = revisions(world, "vault:private")
    assert re.fullmatch(pattern, revision)
    if pool == "reflink":
        assert revision == "2"  # a counter: N+1 (reflink _add_revision)
        assert world.run("qvm-volume", "revert", "vault:private").returncode == 0
        assert revisions(world, "vault:private") == ["3"]  # revert keeps the state as N+1, drops the one used


def test_lvm_revert_changes_data_not_revisions_and_resize_adds_none(world: Sim):
    stop_after_running(world, "vault")
    before = revisions(world, "vault:private")
    image = world.root / "dom0/var/lib/qubes/appvms/vault/private.img"
    data = image.read_bytes()
    assert world.run("qvm-volume", "revert", "vault:private").returncode == 0
    assert image.read_bytes() != data and revisions(world, "vault:private") == before  # lvm.py revert
    assert world.run("qvm-volume", "resize", "vault:private", str(8 * 1024 * 1024)).returncode == 0
    assert revisions(world, "vault:private") == before
    assert volume_info(world, "vault:private", "size").stdout == f"{8 * 1024 * 1024}\n".encode()
    source = world.root / "import.img"
    source.write_bytes(b"x" * 4096)
    assert world.run("qvm-volume", "import", "vault:private", str(source)).returncode == 0
    assert revisions(world, "vault:private") != before  # an import commits


def test_qvm_pool_info_names_the_driver_and_the_pool_s_size_and_usage(world: Sim):
    """Facts V2: the tool prints every key=value line of admin.pool.Info, sorted after `name`, and
    qubesd appends `size` and `usage` there for drivers that know them."""
    text = world.run("qvm-pool", "info", "vm-pool").stdout.decode()
    assert text.splitlines()[0] == "name               vm-pool" and "driver             lvm_thin" in text
    rows = dict(line.split(None, 1) for line in text.splitlines())
    assert 0 < int(rows["usage"]) <= int(rows["size"])
    assert list(rows)[1:] == sorted(list(rows)[1:])


# --- §8 in the driver: which qubes a nightly run skips -------------------------------------------------


def dry_run(world: Sim) -> dict[str, str]:
    return {q: r["why"] for q, r in qtb_json(world, "backup", "--dry-run")["qubes"].items()}


@pytest.mark.parametrize("engine", ["restic"])
def test_what_counts_as_changed(backed_up, engine):
    world = backed_up.world
    assert all(why.startswith("unchanged") for q, why in dry_run(world).items() if q != "dom0")
    assert dry_run(world)["dom0"] == "always backed up: dom0's home has no volume revisions"
    # each of these changes exactly one qube's fingerprint: a run, settings, firewall, size
    stop_after_running(world, "vault")
    world.run("qvm-prefs", "personal", "label", "green", check=True)
    firewall = world.root / "dom0/var/lib/qubes/appvms/work/firewall.xml"
    firewall.write_text(firewall.read_text().replace("accept", "drop"))
    world.run("qvm-volume", "resize", "debian-12:private", str(64 * 1024 * 1024), check=True)
    changed = {q for q, why in dry_run(world).items() if why.startswith("changed since")}
    assert changed == {"vault", "personal", "work", "debian-12"}


def failing_tool(world: Sim, tool: str, when: str) -> None:
    """The world's dom0 `tool` fails (exit 1, no output) when its arguments are `when`."""
    path = world.root / ".sim/dom0-bin" / tool
    path.write_text(f'#!/bin/sh\n[ "$*" = "{when}" ] && exit 1\n' + path.read_text().split("\n", 1)[1])


@pytest.mark.parametrize("engine", ["restic"])
def test_notes_and_what_the_metadata_cannot_tell(backed_up, engine):
    """The qube's notes are part of it; a query that fails, for a volume or for its pool, means
    "back it up", never "unchanged"."""
    world = backed_up.world
    (world.root / "dom0/var/lib/qubes/appvms/work/notes.txt").write_text("remember the milk\n")
    failing_tool(world, "qvm-volume", "info vault:private")
    plan = dry_run(world)
    assert plan["work"].startswith("changed since") and plan["personal"].startswith("unchanged")
    assert plan["vault"] == "always backed up: qvm-volume info vault:private failed"
    failing_tool(world, "qvm-pool", "info vm-pool")  # the pool's driver cannot be told
    plan = dry_run(world)
    assert all(plan[q].startswith("always backed up: pool vm-pool (?)") for q in ("personal", "debian-12"))


@pytest.mark.parametrize("engine", ["restic"])
def test_backup_timestamp_that_every_backup_sets_is_no_change(backed_up, engine):
    xml = (backed_up.world.dom0 / "var/lib/qubes/qubes.xml").read_text()
    assert xml.count('name="backup_timestamp"') == 4  # set by qubesd after each qube's backup (backup.py)
    assert all(why.startswith("unchanged") for q, why in dry_run(backed_up.world).items() if q != "dom0")


@pytest.mark.parametrize(("pool", "why"), [("varlibqubes", "pool varlibqubes (file)"), ("reflink", None)])
def test_pools_the_facts_do_not_cover_are_always_backed_up(tmp_path: Path, pool: str, why: str | None):
    world = make_world(tmp_path / "w", "--pool", pool)
    qtb(world, "init", "--backup-qube", "backup")
    plan = dry_run(world)
    if why is None:
        assert plan["vault"] == "no copy yet"  # file-reflink is covered
    else:
        assert plan["vault"].startswith(f"always backed up: {why}")


def test_revisions_to_keep_zero_means_always(world: Sim):
    state = json.loads((world.root / "world.json").read_text())
    state["volumes"]["vault:private"]["revisions_to_keep"] = 0
    (world.root / "world.json").write_text(json.dumps(state))
    qtb(world, "init", "--backup-qube", "backup")
    assert dry_run(world)["vault"] == "always backed up: private keeps no revisions (revisions_to_keep = 0)"


# --- the backup client's output (qubesadmin/tools/qvm_backup.py) ---------------------------------------


def test_qvm_backup_progress_and_error_text(world: Sim, passphrase_file: Path):
    script = world.root / "qubes/backup/usr/local/bin/failing-store"
    script.write_text("#!/bin/sh\nhead -c 100000 >/dev/null\necho 'store: full%{}' >&2\nexit 3\n")
    script.chmod(0o755)
    proc = world.run("qvm-backup", "-y", "-p", str(passphrase_file), "-d", "backup", "failing-store --x")
    assert proc.returncode == 1
    # backup.py _monitor_process: the VM's stderr without \r \n % { }; the client adds "\nBackup error: "
    assert proc.stderr.endswith(b"\nBackup error: Writing backup to VM backup failed: store: full\n")
    target = world.qube_home("backup") / "backups"
    target.mkdir()
    env = {"QUBES_SIM_TEST_CHUNK_SIZE": str(512 * 1024)}  # a few seconds: progress comes once a second
    proc = world.run("qvm-backup", "-y", "-p", str(passphrase_file), "-d", "backup", str(target), env=env)
    assert proc.returncode == 0
    events = re.findall(rb"\rMaking a backup\.\.\. ([0-9]+\.[0-9]{2})%", proc.stderr)
    assert events and proc.stderr == b"".join(b"\rMaking a backup... " + e + b"%" for e in events)
    assert proc.stdout.endswith(b"\n\n")  # print('\n') at the end
