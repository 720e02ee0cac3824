"""Nothing lost, nothing falsely complete: hostile adapter answers, faults, bad config, dom0 limits.

Each case goes through the real commands on a private copy of a backed-up world (conftest
`backed_up`); a hostile backup qube is tests/attacker.py in front of the real adapter.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from drivertools import install_attacker, mutate, one_line_error, qtb, qtb_json, remove_attacker
from simtools import Sim

from qtb_pipe.actions import restore


def records(world: Sim) -> dict[str, dict]:
    folder = world.dom0 / "var/lib/qtb-pipe/snapshots"
    return {p.name: json.loads(p.read_text()) for p in folder.glob("*.json")}


def complete_ids(world: Sim) -> set[str]:
    return {r["snapshot"] for r in qtb_json(world, "list")["snapshots"] if r["state"] == "complete"}


@contextmanager
def mounted(target: Path, *options: str) -> Iterator[None]:
    """A mount for the test's duration (tests run as root, as CI does), always undone."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *options, str(target)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True, capture_output=True)


def test_lying_commit_answers_are_never_recorded(backed_up, engine):
    world, old = backed_up.world, backed_up.snapshots["work"]
    before, listed = records(world), complete_ids(world)
    mutate(world, "work")
    # a commit that "succeeds" but stored nothing, and one that names the older snapshot
    for answer in ({"id": "f" * 64}, {"id": old}):
        install_attacker(world, {"answer": {"commit": answer}})
        text = one_line_error(qtb(world, "backup", "work", check=False), 5)
        assert "nothing was recorded" in text, text
        assert records(world) == before  # the older record is untouched, nothing invented
    remove_attacker(world)
    assert complete_ids(world) == listed
    qtb(world, "verify", old)  # the genuine older snapshot still restores through qtb-pipe


def test_negative_or_odd_keep_values_are_refused_on_both_sides(backed_up, engine):
    world = backed_up.world
    for value in ("-1", "1.5", "x"):
        one_line_error(qtb(world, "prune", "--keep-daily", value, check=False), 2)
        proc = world.run("qtb-adapter", "prune", "--keep-daily", value, inside="backup")
        one_line_error(proc, 2)
    config = world.dom0 / "etc/qtb-pipe/config.toml"
    good = config.read_text()
    config.write_text(good.replace("keep_daily = 7", "keep_daily = -1"))
    assert "retention.keep_daily" in one_line_error(qtb(world, "prune", check=False), 3)
    config.write_text(good)
    # the adapter's own [retention] table: the same rule (it is the default of qtb-adapter prune)
    adapter_toml = world.qube_home("backup") / ".config/qtb-pipe/adapter.toml"
    kept = adapter_toml.read_text()
    assert "[retention]" not in kept
    adapter_toml.write_text(kept + "\n[retention]\nkeep_daily = -1\n")
    text = one_line_error(world.run("qtb-adapter", "prune", inside="backup"), 3)
    assert "keep_daily must be a whole number >= 0" in text
    adapter_toml.write_text(kept)
    assert complete_ids(world) == set(backed_up.snapshots.values())  # nothing was removed


def test_a_damaged_pruning_journal_stops_prune_and_names_the_file(backed_up, engine):
    world = backed_up.world
    journal = world.dom0 / f"var/lib/qtb-pipe/pruning-{engine}.json"
    journal.write_text('["half a list')  # a prune killed mid-write cannot do this (atomic), a disk can
    text = one_line_error(qtb(world, "prune", "--keep-last", "1", check=False), 3)
    assert str(journal.name) in text and "damaged" in text
    assert complete_ids(world) == set(backed_up.snapshots.values()) and len(records(world)) == len(
        backed_up.snapshots
    )  # nothing removed, no record forgotten
    journal.unlink()
    qtb_json(world, "prune", "--keep-last", "1", "--dry-run")


def test_backup_and_prune_work_right_after_a_restore(backed_up, engine):
    """restic dump cut off by tar2qfile leaves stale locks (borg: a killed borg extract); the
    backup and the prune that come next must not fail on them."""
    world = backed_up.world
    old = backed_up.snapshots["vault"]
    mutate(world, "vault")
    qtb(world, "verify", old)  # two restore passes' worth of cut-off dumps
    newer = qtb_json(world, "backup", "vault")["qubes"]["vault"]["snapshot"]  # straight after
    qtb(world, "verify", old)
    result = qtb_json(world, "prune", "--keep-last", "1")
    assert result["removed"] == [old] and result["qubes"]["vault"]["remaining"] == [newer]
    qtb(world, "backup", "--full", "vault")  # and a backup after the prune


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('backup_qube = ["backup"]', "backup_qube"),
        ('include = "work"', "include"),
        ("exclude = 5", "exclude"),
        ("exclude = [5]", "exclude"),
        ('start_backup_qube = "no"', "start_backup_qube"),
        ('adapter_command = ["qtb-adapter"]', "adapter_command"),
    ],
)
def test_wrongly_typed_config_values_name_the_key(world: Sim, line: str, key: str):
    qtb(world, "init", "--backup-qube", "backup")
    config = world.dom0 / "etc/qtb-pipe/config.toml"
    lines = [ln for ln in config.read_text().splitlines() if not ln.startswith(f"{key} =")]
    at = lines.index("[retention]")
    config.write_text("\n".join([*lines[:at], line, *lines[at:]]) + "\n")
    assert key in one_line_error(qtb(world, "backup", check=False), 3)


def test_retention_as_a_number_is_a_config_error(world: Sim):
    qtb(world, "init", "--backup-qube", "backup")
    config = world.dom0 / "etc/qtb-pipe/config.toml"
    config.write_text(config.read_text().split("[retention]")[0] + "retention = 5\n")
    assert "retention" in one_line_error(qtb(world, "prune", check=False), 3)


def test_read_only_records_directory_stops_the_backup_before_the_commit(backed_up, engine):
    world = backed_up.world
    snapshots = world.dom0 / "var/lib/qtb-pipe/snapshots"
    with mounted(snapshots, "--bind", "-o", "ro", str(snapshots)):
        text = one_line_error(qtb(world, "backup", "--full", "vault", check=False), 3)
    assert "snapshot records" in text
    assert complete_ids(world) == set(backed_up.snapshots.values())  # nothing committed without a record


def test_full_records_directory_stops_the_backup_before_the_commit(backed_up, engine):
    """A full disk still lets an empty file be created: the probe must write a record's worth."""
    world = backed_up.world
    snapshots = world.dom0 / "var/lib/qtb-pipe/snapshots"
    saved = {p.name: p.read_bytes() for p in snapshots.iterdir()}
    with mounted(snapshots, "-t", "tmpfs", "-o", "size=64k", "tmpfs"):
        for name, data in saved.items():
            (snapshots / name).write_bytes(data)
        filler = snapshots / ".filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            while True:
                f.write(bytes(4096))
                f.flush()
        text = one_line_error(qtb(world, "backup", "--full", "vault", check=False), 3)
        assert "snapshot records" in text and "No space left" in text
        assert not list(snapshots.glob(".probe-*"))  # the probe leaves nothing behind
    assert complete_ids(world) == set(backed_up.snapshots.values())


def test_a_commit_without_a_record_is_shown_and_never_trusted(backed_up, engine):
    """A crash between the commit and dom0's record leaves a snapshot dom0 does not know."""
    world = backed_up.world
    work = backed_up.snapshots["work"]
    next((world.dom0 / "var/lib/qtb-pipe/snapshots").glob(f"*-{work}.json")).unlink()
    listed = qtb_json(world, "list")
    assert {r["snapshot"]: r["dom0_record"] for r in listed["snapshots"]}[work] == "not recorded"
    assert "work" not in listed["qubes"]  # dom0's catalog holds no copy of it
    assert "not recorded" in qtb(world, "list").stdout.decode()
    assert "dom0 has no record" in one_line_error(qtb(world, "restore", work, check=False), 5)
    assert qtb_json(world, "backup", "--dry-run")["qubes"]["work"]["status"] == "to back up"


def test_prune_never_lets_an_unrecorded_snapshot_replace_a_qubes_recorded_copy(backed_up, engine):
    """A newer copy committed without dom0's record (a crash between the two) cannot be restored
    through qtb-pipe: keep-last 1 must not count it as the qube's copy and remove the recorded one."""
    world = backed_up.world
    recorded = backed_up.snapshots["work"]
    unrecorded = qtb_json(world, "backup", "--full", "work")["qubes"]["work"]["snapshot"]
    next((world.dom0 / "var/lib/qtb-pipe/snapshots").glob(f"*-{unrecorded}.json")).unlink()
    result = qtb_json(world, "prune", "--keep-last", "1")
    assert recorded not in result["removed"] and result["qubes"]["work"]["remaining"] == [recorded]
    assert unrecorded in result["kept"]  # the newest run in the timeline: kept by the rules
    assert qtb_json(world, "list")["qubes"]["work"]["snapshot"] == recorded
    work = qtb_json(world, "verify", recorded)["qubes"]["work"]  # dom0 still restores from it
    assert work["verified"] == work["chunks"] > 0


@pytest.mark.parametrize("engine", ["restic", "borg"])
def test_full_backup_qube_says_so_on_every_run(world: Sim, engine: str):
    from drivertools import setup_qtb

    repo = world.qube_home("backup") / "small-fs"
    with mounted(repo, "-t", "tmpfs", "-o", "size=2m", "tmpfs"):
        setup_qtb(world, engine, repo / "repo")
        for _ in range(2):  # the second run lost its reason before
            before = {q: r["snapshot"] for q, r in qtb_json(world, "list")["qubes"].items()}
            proc = qtb(world, "backup", "--json", "debian-12", "work", check=False)
            text = one_line_error(proc, 1)
            assert "ran out of space" in text, text
            failed = {q for q, r in json.loads(proc.stdout)["qubes"].items() if r["status"] == "failed"}
            after = {q: r["snapshot"] for q, r in qtb_json(world, "list")["qubes"].items()}
            assert failed and all(after.get(q) == before.get(q) for q in failed)  # no new copy of those


def test_hostile_check_and_prune_answers(backed_up, engine):
    world = backed_up.world
    install_attacker(world, {"answer": {"check": {"ok": False, "output": "bad"}}})
    assert "did not pass" in one_line_error(qtb(world, "check", check=False), 1)
    for answer in ({"remove": "all"}, {"remove": [1]}, ["x"], {"remove": ["bad id!"]}):
        install_attacker(world, {"answer": {"prune": answer}})
        one_line_error(qtb(world, "prune", "--keep-last", "1", "--dry-run", check=False), 1)


def test_secret_problems_are_config_errors(backed_up, engine):
    world = backed_up.world
    secret = world.dom0 / "etc/qtb-pipe/secret"
    secret.chmod(0o644)
    assert "chmod 600" in one_line_error(qtb(world, "backup", check=False), 3)
    secret.unlink()
    assert "qtb-pipe init" in one_line_error(qtb(world, "backup", check=False), 3)
    secret.mkdir()
    text = one_line_error(qtb(world, "backup", check=False), 3)
    assert "Is a directory" in text and "init --recovery-key" in text  # what it is, and the way back


def test_every_command_removes_dead_runs_directories_and_keeps_live_ones(backed_up, engine):
    world = backed_up.world
    runs = world.dom0 / "var/lib/qtb-pipe/runs"
    dead, live, staging = runs / ("d" * 32), runs / ("e" * 32), runs / f".new-{'f' * 32}"
    for d in (dead, live, staging):  # staging: its process died inside Run.create (mkdir .. rename)
        d.mkdir(parents=True)
        (d / "lock").touch()
    (dead / "passphrase").write_text("qtb1:...:secret\n")
    holder = os.open(live / "lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a run still in progress
    creating = os.open(runs.parent / "runs.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(creating, fcntl.LOCK_SH)  # a live Run.create: the scan waits for it
    try:
        lister = subprocess.Popen(["qubes-sim", "run", str(world.root), "--", "qtb-pipe", "list"])
        time.sleep(0.5)
        assert lister.poll() is None and dead.exists()
        os.close(creating)
        assert lister.wait() == 0
        assert not dead.exists() and not staging.exists() and live.exists()
    finally:
        os.close(holder)
    qtb(world, "list")
    assert not live.exists()


@pytest.mark.parametrize("engine", ["restic"])
def test_an_oversized_member_never_fills_dom0s_disk(backed_up, engine):
    """14.4: the driver passes --ignore-size-limit (qubes.xml's backup-size is wrong for an uncompressed
    stream), so dom0's bound is RLIMIT_FSIZE on qvm-backup-restore and its unpacker, from the sealed
    manifest: a member served far larger than sealed is cut there, before the shim even sees it."""
    world = backed_up.world
    snapshot = backed_up.snapshots["work"]
    body = json.loads(world.run("qtb-adapter", "manifest", snapshot, inside="backup", check=True).stdout)
    sealed = max(c["size"] for c in body["manifest"]["chunks"])
    install_attacker(world, {"inflate": "vm3/private.img.000.enc", "to": 256 * 2**20})
    temp, largest, done = world.dom0_home / "QubesIncoming", [0], threading.Event()

    def watch() -> None:  # the biggest file dom0's restore temp directory ever held
        while not done.is_set():
            for folder, _, names in os.walk(temp):  # os.walk skips what vanishes under it
                for name in names:
                    with contextlib.suppress(OSError):
                        largest[0] = max(largest[0], os.stat(os.path.join(folder, name)).st_size)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        verify = qtb(world, "verify", snapshot, check=False)
        # stock restore only logs the cut and exits 0 (restore.py ~l.2039-2042): dom0 still says it
        restore = qtb(world, "restore", snapshot, "--rename-conflicting", "--single-pass", check=False)
    finally:
        done.set()
        watcher.join()
    for proc in (verify, restore):
        assert "larger than the manifest allows" in one_line_error(proc, 5)
    assert 0 < largest[0] <= sealed + 2**20, (
        f"dom0 held a {largest[0]}-byte file; the manifest allows {sealed}"
    )
    assert not any((temp / "backup#restore").iterdir())  # and nothing is left behind


@pytest.mark.parametrize("engine", ["restic"])
def test_many_small_files_never_fill_dom0s_disk(backed_up, engine):
    """14.4: each file under the bound, but a thousand of them: the unpacker writes ahead of the
    checks (the stock tool decrypts one file at a time), so dom0 bounds the whole temporary
    directory too (from the manifest) and kills the run."""
    world = backed_up.world
    snapshot = backed_up.snapshots["work"]
    body = json.loads(world.run("qtb-adapter", "manifest", snapshot, inside="backup", check=True).stdout)
    chunks = body["manifest"]["chunks"]
    # after the last chunk: the unpacker writes all of it while each genuine chunk is decrypted
    size = max(c["size"] for c in chunks)
    install_attacker(world, {"junk": 1000, "size": size, "after": chunks[-1]["path"] + ".enc"})
    temp, peak, done = world.dom0_home / "QubesIncoming", [0], threading.Event()
    other = threading.Thread(target=another_restore, args=(temp / "backup#restore", 1 << 20))
    other.start()

    def watch() -> None:  # the most disk dom0's restore temp directory ever used (its own count)
        while not done.is_set():
            used = 0
            for folder, _, names in os.walk(temp):
                for name in names:
                    with contextlib.suppress(OSError):
                        used += os.lstat(os.path.join(folder, name)).st_blocks * 512
            peak[0] = max(peak[0], used)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        proc = qtb(world, "verify", snapshot, check=False)
    finally:
        done.set()
        watcher.join()
        other.join()
    # dom0's bound, not the shim: it would refuse the first junk file only once every genuine chunk
    # was decrypted, with all the junk long written (72 MB here, 152 MB in the audit)
    assert "sent more than the snapshot holds" in one_line_error(proc, 5)
    allowed = restore.bounds(chunks, [q["path"] for q in body["manifest"]["qubes"].values()])[1]
    # slack: what the unpacker writes during one poll of the guard (~4-20 MB measured here)
    assert peak[0] <= allowed + (1 << 20) + 32 * 2**20, f"dom0 held {peak[0]} bytes, {allowed} allowed"
    # the killed run's directory is gone; the other restore's is left alone
    assert [p.name for p in (temp / "backup#restore").iterdir()] == ["tmp-another"]


def another_restore(incoming: Path, size: int) -> None:
    """A second qvm-backup-restore (the GUI's, say) that starts once ours is under way (it has
    fetched qubes.xml), with a file of `size` bytes: neither ours to count nor to remove."""
    for _ in range(3000):
        if list(incoming.glob("tmp*/qubes.xml*")):
            break
        time.sleep(0.01)
    (incoming / "tmp-another").mkdir()
    (incoming / "tmp-another/vm1.000").write_bytes(os.urandom(size))


@pytest.mark.parametrize("engine", ["restic"])
def test_another_restores_directory_is_not_counted(backed_up, engine):
    """Only the temporary directory that this pass's tools were given is bounded: one of another
    restore started meanwhile, holding more than the whole bound, does not stop ours."""
    world = backed_up.world
    snapshot = backed_up.snapshots["work"]
    body = json.loads(world.run("qtb-adapter", "manifest", snapshot, inside="backup", check=True).stdout)
    chunks = body["manifest"]["chunks"]
    allowed = restore.bounds(chunks, [q["path"] for q in body["manifest"]["qubes"].values()])[1]
    install_attacker(world, {"slow": 0.2})  # genuine, slowly: the other starts while ours runs
    incoming = world.dom0_home / "QubesIncoming/backup#restore"
    other = threading.Thread(target=another_restore, args=(incoming, allowed + (1 << 20)))
    other.start()
    try:
        verified = qtb_json(world, "verify", snapshot)["qubes"]
    finally:
        other.join()
    assert all(q["verified"] == q["chunks"] for q in verified.values()), verified
    assert (incoming / "tmp-another/vm1.000").stat().st_size == allowed + (1 << 20)


@pytest.mark.parametrize("engine", ["restic"])
def test_a_restore_dom0s_home_has_no_room_for_is_refused_before_any_data(backed_up, engine):
    """12.5: with less free in dom0's home than the largest chunk + 500 MiB the unpacker would wait
    for room with no timeout (facts R1): said before any data is read, no stock tool started."""
    world = backed_up.world
    with mounted(world.dom0_home, "-t", "tmpfs", "-o", "size=400m", "tmpfs"):
        single = qtb(world, "verify", backed_up.snapshots["work"], check=False)
        every = qtb(world, "restore", "--all", "--rename-conflicting", check=False)
    for proc in (single, every):
        text = one_line_error(proc, 1)
        assert "dom0's home has 400.0 MiB free and this restore needs" in text, text
        assert proc.stderr.count(b"\n") == 1  # that line alone: no pass began, the stock tool never spoke
    assert "free, dom0's home" in one_line_error(every, 1)  # --all restores it: its size counts too


@pytest.mark.parametrize("engine", ["restic"])
def test_a_restore_the_default_pool_has_no_room_for_is_refused_before_any_data(backed_up, engine):
    """Facts V8: the restored volumes go to qubes-prefs' default pool, whose room the stock tool never
    checks; qvm-pool info's size and usage say it (here a 1 MiB file system under /var/lib/qubes)."""
    world, pool = backed_up.world, backed_up.world.dom0 / "var/lib/qubes"
    qubes_xml = (pool / "qubes.xml").read_bytes()  # qubesd's, in that directory too
    with mounted(pool, "-t", "tmpfs", "-o", "size=1m", "tmpfs"):
        (pool / "qubes.xml").write_bytes(qubes_xml)
        refused = qtb(world, "restore", backed_up.snapshots["work"], "--rename-conflicting", check=False)
        verified = qtb(world, "verify", backed_up.snapshots["work"], check=False)  # makes no volume
    text = one_line_error(refused, 1)
    assert re.search(r"error: pool vm-pool has [0-9.]+ [KM]iB free and .* need [0-9.]+ MiB there", text), text
    assert refused.stderr.count(b"\n") == 1  # no pass began
    assert verified.returncode == 0, verified.stderr.decode()
    assert "work-1" not in world.digest()["qubes"]


@pytest.mark.parametrize("engine", ["restic"])
def test_the_unpacker_waits_for_free_space(backed_up, engine):
    """Facts R1 (-w 500 MiB): with less free than a file plus 500 MiB the unpacker waits before the
    file's data (the file exists, empty), and goes on once there is room; with 1 GiB free (the
    stock tool's own check before the data) the restore then completes."""
    world = backed_up.world
    temp = world.dom0_home / "QubesIncoming"
    with mounted(temp, "-t", "tmpfs", "-o", "size=1100m", "tmpfs"):
        filler = temp / "filler"
        filler.write_bytes(bytes(620 * 2**20))  # 480 MiB free: under 500 MiB for any file
        verify = subprocess.Popen(
            ["qubes-sim", "run", str(world.root), "--", "qtb-pipe", "verify", backed_up.snapshots["work"]],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        try:
            header = []
            for _ in range(600):  # the first file of the first retrieval, opened, waiting for room
                header = list(temp.glob("*backup#restore*/**/backup-header")) or header
                if header:
                    break
                time.sleep(0.1)
            time.sleep(2)
            waited = bool(header) and header[0].stat().st_size == 0 and verify.poll() is None
            filler.unlink()
            _, err = verify.communicate(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(verify.pid, signal.SIGKILL)
    assert waited, "the unpacker did not wait for free space"
    assert verify.returncode == 0, err.decode()


@pytest.mark.parametrize("engine", ["restic"])
def test_a_volume_import_that_fails_is_a_failed_restore(backed_up, engine):
    """13.2: stock qvm-backup-restore logs a refused volume import and exits 0; dom0 says it failed."""
    world = backed_up.world
    target = world.dom0 / "var/lib/qubes/appvms/work-1"  # where the renamed copy's volumes go
    with mounted(target, "-t", "tmpfs", "-o", "size=64k", "tmpfs"):
        proc = qtb(world, "restore", "--qube", "work", "--rename-conflicting", "--single-pass", check=False)
    error = one_line_error(proc, 1)
    assert "exited 0 but reported" in error and "Failed to restore volume private" in error, error


@pytest.mark.parametrize("engine", ["restic"])
def test_a_restore_that_exits_0_without_creating_the_qube_is_a_failure(backed_up, engine):
    """13.2: dom0 checks from its own side that every qube a pass was to create exists, renamed
    copies included. The fault: a qvm-backup-restore whose qubes vanish (qubesd dropped them)."""
    world = backed_up.world
    tool = world.root / ".sim/dom0-bin/qvm-backup-restore"
    qubes_xml = world.dom0 / "var/lib/qubes/qubes.xml"
    real = tool.read_text().replace("exec ", "")
    tool.write_text(f'#!/bin/sh\ncp {qubes_xml} {qubes_xml}.before\n{real}code=$?\n'
                    f'mv {qubes_xml}.before {qubes_xml}\nexit $code\n')  # fmt: skip
    proc = qtb(world, "restore", "--qube", "work", "--rename-conflicting", "--single-pass", check=False)
    assert "did not create a renamed copy of work" in one_line_error(proc, 1)
    from qubes_sim.world import parse_qubes_xml, render_qubes_xml

    qubes_xml.write_bytes(
        render_qubes_xml({n: q for n, q in parse_qubes_xml(qubes_xml.read_bytes()).items() if n != "vault"})
    )
    proc = qtb(world, "restore", "--qube", "vault", "--single-pass", check=False)
    assert "did not create vault" in one_line_error(proc, 1)


@pytest.mark.parametrize("engine", ["restic"])
def test_a_backup_that_stalls_is_stopped_and_commits_nothing(backed_up, engine):
    """13.6: real backup_do can wait on the backup qube forever; stall_timeout stops it."""
    world = backed_up.world
    config = world.dom0 / "etc/qtb-pipe/config.toml"
    config.write_text(config.read_text().replace("stall_timeout = 1800", "stall_timeout = 3"))
    before = complete_ids(world)
    install_attacker(world, {"stall": "store", "seconds": 40})
    mutate(world, "work")
    started = time.monotonic()
    proc = qtb(world, "backup", "work", check=False)
    assert time.monotonic() - started < 35  # not the 40 s the backup qube would have hung
    assert "made no progress for 3 s (stall_timeout)" in one_line_error(proc, 1)
    remove_attacker(world)
    assert complete_ids(world) == before


@pytest.mark.parametrize("engine", ["restic"])
def test_a_restore_that_stalls_is_stopped(backed_up, engine):
    """A backup qube that stops serving hangs stock qvm-backup-restore for ever (a weekly verify would
    then hold the jobs lock against every night's backup); stall_timeout stops it too. The marker is
    the shim's accepted count, as restore says little on stderr while data flows."""
    world = backed_up.world
    config = world.dom0 / "etc/qtb-pipe/config.toml"
    config.write_text(config.read_text().replace("stall_timeout = 1800", "stall_timeout = 3"))
    install_attacker(world, {"stall": "dump", "seconds": 40})
    restore = ("restore", "--qube", "work", "--rename-conflicting")
    for args in (("verify", backed_up.snapshots["work"]), restore):
        started = time.monotonic()
        proc = qtb(world, *args, check=False)
        assert time.monotonic() - started < 35, args  # not the 40 s the backup qube would have hung
        assert "made no progress for 3 s (stall_timeout)" in one_line_error(proc, 1)
    assert not (world.dom0 / "var/lib/qubes/appvms/work-1").exists()
    # a slow backup qube that keeps serving is not stalled, though restore is silent longer than that
    # (a chunk a second; the window is 5 s there: on a loaded machine a chunk's own work has taken 2 s)
    config.write_text(config.read_text().replace("stall_timeout = 3", "stall_timeout = 5"))
    install_attacker(world, {"slow": 1.0})
    started = time.monotonic()
    work = qtb_json(world, "verify", backed_up.snapshots["work"])["qubes"]["work"]
    assert work["verified"] == work["chunks"] and time.monotonic() - started > 5 + 1  # past the window


@pytest.mark.parametrize("engine", ["restic"])
def test_a_qubes_xml_over_the_retrieval_cap_is_said_at_backup_and_before_restore(backed_up, engine):
    """13.6: qvm-backup-restore fetches qubes.xml from a qube under a fixed 1 MiB cap and then says
    only "unexpected files in archive: got []" (docs/qubes-facts.md R8)."""
    from qubes_sim.world import World

    world = backed_up.world
    sim = World(world.root)
    host = sim.load_qubes()
    host["vault"].features["big-note"] = "x" * (1100 * 1024)  # a qubes.xml over 1 MiB, uncompressed
    sim.save_qubes(host)
    done = qtb_json(world, "backup", "vault")
    assert any("over the 1 MiB" in w for w in done["warnings"])
    proc = qtb(world, "restore", "--qube", "vault", "--rename-conflicting", check=False)
    assert "is over the 1 MiB that qvm-backup-restore accepts" in one_line_error(proc, 1)
    assert b"pass 1/2" not in proc.stderr  # said before any data is read


def start(world: Sim, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["qubes-sim", "run", str(world.root), "--", "qtb-pipe", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: a kill takes qvm-backup-restore along, as a crash
    )


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)
    proc.communicate()


def test_kills_during_restore_and_prune_leave_everything_usable(backed_up, engine):
    world = backed_up.world
    restore = start(world, "restore", "--qube", "work", "--rename-conflicting")
    for line in restore.stderr:
        if b"pass 2/2" in line:  # killed while qvm-backup-restore creates and fills work-1
            kill_group(restore)
            break
    assert restore.wait() != 0
    for _ in range(2):  # two more copies of work: something for prune to remove
        mutate(world, "work", seed=len(complete_ids(world)))
        qtb(world, "backup", "work")
    prune = start(world, "prune", "--keep-last", "1")
    time.sleep(1.5)  # in the middle of it (restic forget/prune, borg prune/compact in the backup qube)
    kill_group(prune)
    qtb_json(world, "list")  # any command removes the dead runs' directories (they hold the secret)
    assert not list((world.dom0 / "var/lib/qtb-pipe/runs").iterdir())
    done = qtb_json(world, "prune", "--keep-last", "1")  # stale locks of the killed ones do not block it
    assert all(len(q["remaining"]) == 1 for q in done["qubes"].values()), done
    qtb(world, "check")
    before = set(world.digest()["qubes"])  # a work-1 the killed restore left, or none
    restored = qtb_json(world, "restore", "--qube", "work", "--rename-conflicting", "--single-pass")
    (name,) = set(world.digest()["qubes"]) - before
    assert restored["qubes"]["work"]["ok"]
    assert world.digest(name)["qubes"][name]["files"] == world.digest("work")["qubes"]["work"]["files"]


def test_a_prune_whose_answer_is_lost_has_its_records_forgotten_by_the_next(backed_up, engine):
    """The backup qube removed snapshots but dom0 never heard (killed, qube shut down): dom0 noted
    what was listed before, so the next prune forgets the records of what is gone."""
    world = backed_up.world
    for seed in (31, 32):
        mutate(world, "work", seed=seed)
        qtb(world, "backup", "work")
    install_attacker(world, {"lose_answer": "prune"})
    qtb(world, "prune", "--keep-last", "1", check=False)
    remove_attacker(world)
    listed = qtb_json(world, "list")
    assert listed["qubes"]["work"]["copies"] == 3  # the records stay: dom0 was not told
    present = {r["snapshot"] for r in listed["snapshots"] if r["state"] == "complete"}
    lost = {r["id"] for r in records(world).values()} - present
    assert lost  # the real prune did remove old copies of work
    done = qtb_json(world, "prune", "--keep-last", "1")
    assert lost <= set(done["removed"]) and not lost & {r["id"] for r in records(world).values()}
    assert all(len(q["remaining"]) == 1 for q in done["qubes"].values()), done
    assert all(q["in_repository"] for q in qtb_json(world, "list")["qubes"].values())


def test_two_backups_at_once_both_commit_or_say_why(backed_up, engine):
    world = backed_up.world
    mutate(world, "work", "vault", seed=21)
    runs = {q: start(world, "backup", q, "--json") for q in ("work", "vault")}
    results = {q: (p.wait(), *p.communicate()) for q, p in runs.items()}
    latest = {q: r["snapshot"] for q, r in qtb_json(world, "list")["qubes"].items()}
    for qube, (code, out, err) in results.items():
        if code == 0:
            assert latest[qube] == json.loads(out)["qubes"][qube]["snapshot"]
        else:  # e.g. borg's repository lock: one line, and the qube's old copy stays the newest
            assert latest[qube] == backed_up.snapshots[qube] and b"Traceback" not in err, err
    assert any(code == 0 for code, _, _ in results.values())
    verified = qtb_json(world, "verify")
    assert all(q["ok"] for q in verified["qubes"].values())


def test_hooks_run_around_the_jobs_and_a_failing_one_is_said(backed_up, engine, tmp_path: Path):
    """[hooks] (issue 12.6): before/after/on_error around backup, prune, verify and check, not on a
    dry run; a failing `before` stops the job, a hung hook is stopped at hooks.timeout."""
    world, log = backed_up.world, tmp_path / "hooks.log"
    config = world.dom0 / "etc/qtb-pipe/config.toml"
    text = config.read_text().split("\n[hooks]\n")[0] + "\n"

    def hooks(**stages: object) -> None:
        config.write_text(text + "[hooks]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in stages.items()))

    def say(what: str) -> str:
        return f'echo "{what} $QTB_PIPE_COMMAND $QTB_PIPE_EXIT_CODE" >> {log}'

    hooks(before=[say("before")], after=[say("after")], on_error=[say("error")])
    qtb_json(world, "backup")
    qtb(world, "backup", "--dry-run")
    qtb(world, "prune", "--dry-run")
    assert log.read_text().splitlines() == ["before backup ", "after backup "]  # none on dry runs
    # an argument error (a qube or snapshot id that does not exist as written) is said before any hook
    for args in (("backup", "no-such-qube"), ("backup", "-x", "no-such-qube"), ("verify", "bad id!")):
        assert "error: " in one_line_error(qtb(world, *args, check=False), 2)
    assert len(log.read_text().splitlines()) == 2, log.read_text()
    # ...but a config that names a qube gone from dom0 is the nightly job's failure: on_error hears it
    config.write_text(config.read_text().replace("include = []", 'include = ["gone"]'))
    one_line_error(qtb(world, "backup", check=False), 2)
    config.write_text(config.read_text().replace('include = ["gone"]', "include = []"))
    assert log.read_text().splitlines()[2:] == ["before backup ", "error backup 2"]
    before = complete_ids(world)
    failing = ["echo mount failed >&2; exit 3", say("never")]
    hooks(before=failing, after=[say("after")], on_error=[say("error")])
    proc = qtb(world, "backup", "--json", check=False)
    assert proc.returncode == 1 and "exited with code 3: mount failed" in json.loads(proc.stdout)["error"]
    assert complete_ids(world) == before  # the job did not run
    assert log.read_text().splitlines()[4:] == ["error backup 1"]  # and not "never", nor "after"
    # a hung after hook: stopped at the timeout; the check itself passed and its result stays
    hooks(after=["sleep 60"], timeout=1)
    started = time.monotonic()
    proc = qtb(world, "check", "--json", check=False)
    result = json.loads(proc.stdout)
    assert proc.returncode == 1 and result["ok"] and "still running after 1 s" in result["error"]
    assert time.monotonic() - started < 30
    hooks(on_error=["exit 1"], before=["exit 2"])  # on_error's own failure is only a warning
    proc = qtb(world, "check", check=False)
    assert "warning: on_error hook 'exit 1' exited with code 1" in proc.stderr.decode()
    assert "before hook 'exit 2' exited with code 2" in one_line_error(proc, 1)
    hooks(before="echo not a list")
    assert "hooks.before" in one_line_error(qtb(world, "check", check=False), 3)


def test_without_the_shim_backup_and_restore_refuse_before_anything_runs(backed_up, engine):
    """One owner decides "will the shim run?" (issue 11): qubesd's PATH for a backup, the user's for
    qvm-backup-restore; either way exit 7 before a stock tool starts, nothing left pending."""
    world = backed_up.world
    qtb(world, "uninstall-shim")
    text = one_line_error(qtb(world, "backup", "--full", "vault", check=False), 7)
    assert "the scrypt shim is not active: no shim at" in text and "qtb-pipe install-shim" in text
    text = one_line_error(qtb(world, "restore", "--qube", "vault", "--verify-only", check=False), 7)
    assert "qvm-backup-restore would run" in text and "not the qtb-pipe shim" in text
    assert not [s for s in qtb_json(world, "list")["snapshots"] if s["state"] != "complete"]
    qtb(world, "install-shim")
    qtb(world, "verify", backed_up.snapshots["vault"])


def test_records_that_cannot_be_read_stop_prune_and_list(backed_up, engine):
    """A records directory dom0 cannot list is not "no records": prune would then protect no qube's
    newest copy (only recorded snapshots count as copies) and forget nothing it should."""
    world = backed_up.world
    snapshots = world.dom0 / "var/lib/qtb-pipe/snapshots"
    snapshots.rename(snapshots.with_name("saved"))
    snapshots.write_text("not a directory\n")
    for args in (("prune", "--keep-last", "0", "--keep-daily", "0"), ("list",), ("backup", "--dry-run")):
        assert "cannot read dom0's records" in one_line_error(qtb(world, *args, check=False), 3)
    snapshots.unlink()
    snapshots.with_name("saved").rename(snapshots)
    assert complete_ids(world) == set(backed_up.snapshots.values())  # nothing was removed
