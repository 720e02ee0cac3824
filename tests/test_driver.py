"""`qtb-pipe` end to end on qubes-sim with the real shim, real restic and real borg.

Most cases start from `backed_up` (conftest): a private copy of a world that was set up and backed
up once per engine (one snapshot per qube), so no test repeats the full backup.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pexpect
import pytest
import qtb_adapters
from conftest_remote import rclone_rest_server, sshd_server
from drivertools import (
    ALL,
    QTB_ENV,
    adapter_init,
    install_attacker,
    mutate,
    one_line_error,
    qtb,
    qtb_json,
    remove_attacker,
    setup_qtb,
)
from simtools import FAST_ENV, Sim, make_world

import qtb_pipe
from qtb_pipe.ui import human_bytes
from scrypt_shim.shim import SHIM_VERSION

__all__ = ["rclone_rest_server", "sshd_server"]  # fixtures, found by pytest here


def snapshots(world: Sim) -> list[dict]:
    return [s for s in qtb_json(world, "list")["snapshots"] if s["state"] == "complete"]


def test_whole_system_restores_from_each_qubes_newest_copy_onto_a_fresh_system(
    backed_up, engine, fresh_world
):
    """From the recovery sheet alone (12.2): what it says sets up the backup qube and dom0."""
    world = backed_up.world
    mutate(world, "work")
    newest = qtb_json(world, "backup")["snapshots"][-1]  # dom0's home and work again, work last
    kit = qtb_json(world, "recovery-kit")
    assert kit["repository"] == str(backed_up.repo) and (kit["key_export"] is not None) == (engine == "borg")
    assert kit["recovery_key"] in kit["sheet"] and kit["password"] in kit["sheet"]
    # step 3 names the flags the new system may need (used below, as the refusal there says)
    assert "--ignore-missing" in kit["sheet"] and "--skip-conflicting" in kit["sheet"]
    # -o FILE: the sheet in a file only its owner reads, and nothing secret on the terminal
    sheet = world.root.parent / "recovery-sheet.txt"
    said = qtb(world, "recovery-kit", "-o", str(sheet)).stdout.decode()
    assert said == f"wrote the recovery sheet to {sheet} (mode 0600)\n" and kit["recovery_key"] not in said
    assert sheet.stat().st_mode & 0o777 == 0o600 and kit["recovery_key"] in sheet.read_text()
    adapter_init(fresh_world, kit["engine"], kit["repository"], password=kit["password"])
    key = kit["recovery_key"]
    mistyped = key[:3] + ("1" if key[3] != "1" else "2") + key[4:]
    proc = qtb(
        fresh_world, "init", "--backup-qube", kit["backup_qube"], "--recovery-key", mistyped, check=False
    )
    assert proc.returncode == 2 and b"mistyped" in proc.stderr
    other = qtb_json(make_world(fresh_world.root.parent / "other", "--bare"), "init")["recovery_key"]
    proc = qtb(
        fresh_world,
        "init",
        "--backup-qube",
        "backup",
        "--engine",
        engine,
        "--recovery-key",
        other,
        check=False,
    )
    assert proc.returncode == 5 and b"does not open snapshot" in proc.stderr
    assert not (fresh_world.dom0 / "etc/qtb-pipe/secret").exists()  # refused: nothing written
    done = qtb_json(fresh_world, "init", "--backup-qube", "backup", "--engine", engine, "--recovery-key", key)
    assert done["key_checked_against"] == newest and done["warnings"] == []
    assert (done["adapter"]["qube"], done["adapter"]["engine"]) == ("backup", engine)  # 12.1: it answers
    qtb(fresh_world, "install-shim")
    proc = qtb(fresh_world, "restore", "--all", check=False)
    assert proc.returncode == 4 and b"--new-system" in proc.stderr  # no dom0 record: explicit consent
    # sys-net (work's net qube) was not backed up and is not on the fresh system: as qvm-backup-restore
    # would, qtb-pipe refuses, before any data is read, unless told what to do
    proc = qtb(fresh_world, "restore", "--all", "--new-system", check=False)
    assert proc.returncode == 2 and b"needs net qube sys-net" in proc.stderr
    result = qtb_json(fresh_world, "restore", "--all", "--new-system", "--ignore-missing", "--single-pass")
    assert set(result["qubes"]) == set(ALL) and all(q["ok"] for q in result["qubes"].values())
    assert result["qubes"]["work"]["snapshot"] != backed_up.snapshots["work"]  # the newest copy
    assert fresh_world.digest(*ALL, restored_home=True) == world.digest(*ALL)


def test_nightly_run_backs_up_only_what_changed(backed_up, engine):
    world = backed_up.world
    fixture_done = max(q["time"] for q in qtb_json(world, "list")["qubes"].values())
    again = qtb_json(world, "backup")
    assert {q for q, r in again["qubes"].items() if r["status"] == "backed up"} == {"dom0"}  # home: always
    assert again["qubes"]["work"]["why"].startswith(f"unchanged since {backed_up.snapshots['work'][:12]}")
    mutate(world, "work")
    plan = qtb_json(world, "backup", "--dry-run", "-x", "dom0")
    assert {q: r["status"] for q, r in plan["qubes"].items()} == {
        "debian-12": "unchanged", "work": "to back up", "personal": "unchanged", "vault": "unchanged",
    }  # fmt: skip
    checked = qtb_json(world, "config", "check")["qubes"]  # config check shows the same plan
    assert {q: checked[q] for q in plan["qubes"]} == plan["qubes"]
    assert checked["vault"]["why"].startswith(f"unchanged since {backed_up.snapshots['vault'][:12]}")
    assert len(snapshots(world)) == len(backed_up.snapshots) + 1  # a dry run changes nothing
    text = qtb(world, "backup", "--dry-run", "-x", "dom0").stdout.decode()
    night = qtb_json(world, "backup", "-x", "dom0")
    assert [q for q, r in night["qubes"].items() if r["status"] == "backed up"] == ["work"]
    # the estimate: work's newest copy (a run of its own) streamed what tonight's run then streams
    estimate, streamed = plan["qubes"]["work"]["estimated_bytes"], night["qubes"]["work"]["stream_bytes"]
    assert abs(estimate - streamed) < 0.1 * streamed
    assert f"(about {human_bytes(estimate)})" in text and f"about {human_bytes(estimate)} to stream\n" in text
    full = qtb_json(world, "backup", "--full", "vault")
    assert full["qubes"]["vault"]["status"] == "backed up" and full["qubes"]["vault"]["why"] == "--full"
    history = qtb_json(world, "list", "--qube", "work")
    listed = history["qubes"]
    assert listed["work"]["copies"] == 2 and listed["work"]["snapshot"] == night["qubes"]["work"]["snapshot"]
    assert [h["snapshot"] for h in listed["work"]["history"]][1] == backed_up.snapshots["work"]
    assert list(listed) == ["work"]  # only that qube, and only the snapshots that hold it
    assert [r["snapshot"] for r in history["snapshots"]] == [
        r["snapshot"] for r in qtb_json(world, "list")["snapshots"] if "work" in r["qube_names"]
    ]
    # --as-of: the newest copies made by then; several --qube names, each from its own copy
    args = ("--qube", "work", "--qube", "vault", "--verify-only")
    then = qtb_json(world, "restore", *args, "--as-of", fixture_done)["qubes"]
    assert {q: r["snapshot"] for q, r in then.items()} == {
        q: backed_up.snapshots[q] for q in ("work", "vault")
    }
    now = qtb_json(world, "restore", *args)["qubes"]
    assert now["work"]["snapshot"] == night["qubes"]["work"]["snapshot"] and now["work"]["ok"]
    assert now["vault"]["snapshot"] == full["qubes"]["vault"]["snapshot"] and now["vault"]["ok"]


@pytest.mark.parametrize("engine", ["restic"])
def test_progress_is_drawn_on_a_terminal(backed_up, engine):
    """Real qvm-backup's `Making a backup... NN.NN%` (qubes-sim prints it too), drawn by qtb-pipe
    as one line per qube on a terminal, and cleared before the summary; restore and verify draw the
    bytes the shim accepted."""
    # qubesd sends at most one progress event a second: 64 KiB chunks make the run last a few
    small_chunks = {"QUBES_SIM_TEST_CHUNK_SIZE": str(64 * 1024)}
    env = {k: v for k, v in {**os.environ, **FAST_ENV, **QTB_ENV, **small_chunks}.items() if v is not None}
    argv = ["run", str(backed_up.world.root), "--", "qtb-pipe", "backup", "--full", "debian-12"]
    child = pexpect.spawn("qubes-sim", argv, env=env, timeout=120)
    bytes_rate = r"[0-9.]+ (B|KiB|MiB) \([0-9.]+ (B|KiB|MiB)/s\)"
    child.expect(r"\rbackup debian-12: +[0-9]{1,3}\.[0-9]%  " + bytes_rate + r"  ETA [0-9]+(s|m[0-9]{2}s)")
    child.expect(r"\r\x1b\[K")  # the line is cleared when the qube is done
    child.expect(r"1 qube\(s\) backed up: ")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    # not on a terminal (a timer's run, a pipe): no progress line at all
    piped = qtb(backed_up.world, "backup", "--full", "debian-12", env=small_chunks).stderr
    assert b"qtb-pipe: backing up debian-12" in piped and b"backup debian-12:" not in piped
    snapshot = qtb_json(backed_up.world, "list")["qubes"]["debian-12"]["snapshot"]
    # restore and verify: the bytes of the chunks the shim accepted, once a second, for each pass
    # (they said nothing between "pass 1/2" and the end); a value above 0 shows it moves
    moving = r" +(?!0\.0%)[0-9]{1,3}\.[0-9]%  [0-9.]+ (B|KiB|MiB) \([0-9.]+ (B|KiB|MiB)/s\)"
    restore = ["--", "qtb-pipe", "restore", snapshot, "debian-12", "--rename-conflicting"]
    for command, lines in (
        (["--", "qtb-pipe", "verify", snapshot], ["verify debian-12"]),
        (restore, ["verify debian-12", "restore debian-12"]),  # both passes
    ):
        child = pexpect.spawn("qubes-sim", ["run", str(backed_up.world.root), *command], env=env, timeout=120)
        for line in lines:
            child.expect(r"\r" + line + ":" + moving)
            child.expect(r"\r\x1b\[K")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
    piped = qtb(backed_up.world, "verify", snapshot).stderr
    assert b"verify debian-12:" not in piped
    # -q on a terminal: no progress and no notes; the result (stdout) stays
    for command, result in ((["backup", "-q", "--full", "vault"], "1 qube(s) backed up: "),
                            (["verify", "-q", snapshot], "every chunk authenticated")):  # fmt: skip
        argv = ["run", str(backed_up.world.root), "--", "qtb-pipe", *command]
        child = pexpect.spawn("qubes-sim", argv, env=env, timeout=120)
        child.expect(pexpect.EOF)
        child.close()
        shown = child.before.decode()
        assert child.exitstatus == 0 and result in shown, shown
        assert "\r" not in shown.replace("\r\n", "") and "qtb-pipe:" not in shown, shown


def test_progress_off_a_terminal_when_asked(backed_up, engine):
    """--progress: with --json, JSON lines on stdout (qtb() checks each against progress.schema.json)
    and the result last, on one line; without, text lines on stderr although it is a pipe."""
    small_chunks = {"QUBES_SIM_TEST_CHUNK_SIZE": str(64 * 1024)}  # a run of a few seconds
    world = backed_up.world
    proc = qtb(world, "backup", "--full", "debian-12", "--json", "--progress", env=small_chunks)
    *progress, result = (json.loads(line) for line in proc.stdout.decode().splitlines())
    assert progress and all(p["action"] == "backup" and p["qube_names"] == ["debian-12"] for p in progress)
    done = [p["bytes_done"] for p in progress]
    assert done == sorted(done) and done[-1] > 0  # the bytes the shim passed, growing
    assert any(p["eta_seconds"] is not None for p in progress)  # an ETA while under way
    assert result["qubes"]["debian-12"]["status"] == "backed up" and "message_type" not in result
    snapshot = result["qubes"]["debian-12"]["snapshot"]
    proc = qtb(world, "verify", snapshot, "--json", "--progress", env=small_chunks)
    *progress, result = (json.loads(line) for line in proc.stdout.decode().splitlines())
    assert progress and all(p["action"] == "verify" and p["qube_names"] == ["debian-12"] for p in progress)
    assert progress[-1]["bytes_done"] > 0 and result["qubes"]["debian-12"]["verified"] > 0
    text = qtb(world, "verify", snapshot, "--progress").stderr.decode()
    assert re.search(r"^verify debian-12: +[0-9.]+%  [0-9.]+ (B|KiB|MiB) \(", text, re.M), text
    assert "\r" not in text  # lines, not a terminal's redrawn line


def test_list_text_is_in_columns(backed_up, engine):
    """12.7: `list` aligned: every row's values start (left-aligned columns) or end (right-aligned
    ones) where their heading does, in both tables, borg's long archive names included."""
    text = qtb(backed_up.world, "list").stdout.decode()
    tables = [t.splitlines() for t in text.strip("\n").split("\n\n")]
    columns = [
        {"latest copy": "<", "age": ">", "copies": ">"},
        {"time": "<", "state": "<", "stream": ">", "added": ">", "dom0": "<", "qubes": "<"},
    ]
    for table, heads in zip(tables, columns, strict=True):
        header, rows = table[0], [r for r in table[1:] if not r.startswith("    ")]
        assert len(rows) >= len(ALL)
        for head, align in heads.items():
            at = header.index(head) + (0 if align == "<" else len(head) - 1)
            edge = at - 1 if align == "<" else at + 1
            for row in rows:
                assert row[at] != " " and (edge >= len(row) or row[edge] == " "), (head, row, header)


def test_verify_covers_every_qube_and_restores_one_qube_next_to_itself(backed_up, engine):
    world = backed_up.world
    verify = qtb_json(world, "verify")
    assert set(verify["qubes"]) == set(ALL)
    assert all(q["ok"] and q["verified"] == q["chunks"] > 0 for q in verify["qubes"].values())
    assert verify["check"]["ok"] is True
    expected = world.digest("work")["qubes"]["work"]["files"]
    qtb(world, "restore", "--qube", "work", "--rename-conflicting", "--single-pass")
    assert world.digest("work-1")["qubes"]["work-1"]["files"] == expected  # as qvm-backup-restore names it
    proc = qtb(world, "restore", "--qube", "work", check=False)
    assert proc.returncode == 2 and b"--rename-conflicting" in proc.stderr  # said before any data is read
    proc = qtb(world, "restore", backed_up.snapshots["work"], "work", "--skip-conflicting", check=False)
    assert proc.returncode == 1 and b"nothing to restore" in proc.stderr  # not a silent exit 0
    assert "work-2" not in world.digest()["qubes"]


def test_a_qube_whose_copy_fails_is_reported_and_the_others_still_verify(backed_up, engine):
    world = backed_up.world
    install_attacker(world, {"flip": "vm3/private.img.000.enc"})  # work's volume
    proc = qtb(world, "verify", "--json", check=False)
    result = json.loads(proc.stdout)
    assert proc.returncode == 5, proc.stderr.decode()
    assert result["qubes"]["work"]["ok"] is False and "refused" in result["qubes"]["work"]["error"]
    assert all(result["qubes"][q]["ok"] for q in ALL if q != "work")


@pytest.mark.parametrize("engine", ["restic"])
def test_a_qube_whose_manifest_fails_is_reported_and_the_others_still_restore(
    backed_up, fresh_world: Sim, engine
):
    """The manifest is fetched before any pass: one bad one must not stop the other qubes."""
    world = backed_up.world
    install_attacker(world, {"manifest_flip": backed_up.snapshots["work"]})
    proc = qtb(world, "verify", "--json", check=False)
    result = json.loads(proc.stdout)
    assert proc.returncode == 5 == result["exit_code"], proc.stderr.decode()
    assert "manifest rejected" in result["qubes"]["work"]["error"] and result["unreadable"] == {}
    assert all(result["qubes"][q]["ok"] for q in ALL if q != "work")
    # a new system knows a snapshot's qubes only from its manifest: the snapshot is reported
    setup_qtb(fresh_world, engine, backed_up.repo, recovery_key=backed_up.recovery_key)
    install_attacker(fresh_world, {"manifest_flip": backed_up.snapshots["work"]})
    args = ("--all", "--new-system", "--skip-dom0-home", "--ignore-missing", "--json")
    proc = qtb(fresh_world, "restore", *args, check=False)
    result = json.loads(proc.stdout)
    assert proc.returncode == 5, proc.stderr.decode()
    assert list(result["unreadable"]) == [backed_up.snapshots["work"]]
    assert set(result["qubes"]) == set(ALL) - {"work", "dom0"} and all(
        q["ok"] for q in result["qubes"].values()
    )
    restored = fresh_world.digest()["qubes"]
    for name in ("debian-12", "personal", "vault"):
        assert restored[name]["files"] == world.digest(name)["qubes"][name]["files"], name
    assert "work" not in restored
    text = qtb(fresh_world, "verify", "--new-system", "--ignore-missing", check=False).stderr.decode()
    assert f"snapshot {backed_up.snapshots['work']} failed: " in text and "manifest rejected" in text


@pytest.mark.parametrize("engine", ["restic"])
def test_whole_system_as_of_a_time_and_a_qube_refused_in_its_pass(backed_up, fresh_world: Sim, engine):
    """restore --all --as-of TIME takes each qube's newest copy made by then; a qube whose chunk the
    shim refuses during its pass is reported (exit 5) and the other qubes still restore."""
    world = backed_up.world
    fixture_done = max(q["time"] for q in qtb_json(world, "list")["qubes"].values())
    work_then = world.digest("work")["qubes"]["work"]["files"]
    mutate(world, "work")
    night = qtb_json(world, "backup", "-x", "dom0")
    assert night["qubes"]["work"]["status"] == "backed up"
    assert world.digest("work")["qubes"]["work"]["files"] != work_then
    setup_qtb(fresh_world, engine, backed_up.repo, recovery_key=backed_up.recovery_key)
    install_attacker(fresh_world, {"flip": "vm5/private.img.000.enc"})  # vault's volume (qid 5)
    args = ("--all", "--as-of", fixture_done, "--new-system", "--skip-dom0-home", "--ignore-missing")
    proc = qtb(fresh_world, "restore", *args, "--json", check=False)
    result = json.loads(proc.stdout)
    assert proc.returncode == 5 == result["exit_code"], proc.stderr.decode()
    assert {q: r["snapshot"] for q, r in result["qubes"].items()} == {
        q: backed_up.snapshots[q] for q in ALL if q != "dom0"
    }  # work's copy of the night is newer than TIME: not taken
    assert result["qubes"]["vault"]["ok"] is False and "refused" in result["qubes"]["vault"]["error"]
    assert all(r["ok"] for q, r in result["qubes"].items() if q != "vault")
    restored = fresh_world.digest()["qubes"]
    assert "vault" not in restored and restored["work"]["files"] == work_then
    for name in ("debian-12", "personal"):
        assert restored[name]["files"] == world.digest(name)["qubes"][name]["files"], name


@pytest.mark.parametrize(
    "attack",
    [
        {"flip": "vm1/root.img.000.enc"},  # a template's root image
        {"flip": "qubes.xml.000.enc"},
        {"drop": "vm1/root.img.001.enc"},  # a chunk in the middle
        {"drop_last_of": "vm1/root.img"},  # the last chunk of a file
    ],
    ids=["template-root", "qubes-xml", "drop-middle", "drop-last"],
)
@pytest.mark.parametrize("engine", ["restic"])
def test_attacking_backup_qube_is_refused(backed_up, fresh_world: Sim, attack: dict):
    before = fresh_world.digest()
    setup_qtb(fresh_world, "restic", backed_up.repo, recovery_key=backed_up.recovery_key)
    install_attacker(fresh_world, attack)
    template = backed_up.snapshots["debian-12"]
    proc = qtb(fresh_world, "restore", template, "--new-system", check=False)
    assert proc.returncode == 5, proc.stderr.decode()
    assert b"refused" in proc.stderr or b"did not serve" in proc.stderr
    assert fresh_world.digest() == before  # nothing restored: not even a qube created
    assert qtb(fresh_world, "verify", template, "--new-system", check=False).returncode == 5


@pytest.mark.parametrize(
    "attack",
    [
        {"reserve": "vm1/root.img.000.enc", "after": "vm1/private.img.000.enc"},  # after a later file
        {"reserve": "vm1/root.img.000.enc", "after": "vm1/root.img.002.enc"},  # inside its own file
    ],
    ids=["after-a-later-file", "inside-its-file"],
)
@pytest.mark.parametrize("engine", ["restic"])
def test_a_genuine_chunk_served_again_is_refused(backed_up, engine, attack: dict):
    """Issue 13.1 through the real commands. Real restore starts a new inner tar at any `.000` (and
    calls scrypt for it), so a re-served first chunk would truncate that volume and still exit 0."""
    world = backed_up.world
    snapshot = backed_up.snapshots["debian-12"]  # vm1: root.img.000-004, then private.img.000
    proc = world.run("qtb-adapter", "manifest", snapshot, "--engine", engine, inside="backup")
    paths = [c["path"] for c in json.loads(proc.stdout)["manifest"]["chunks"]]
    assert {attack["reserve"][:-4], attack["after"][:-4]} <= set(paths)
    install_attacker(world, attack)
    for args in (("verify", snapshot), ("restore", snapshot, "--rename-conflicting", "--single-pass")):
        proc = qtb(world, *args, "--json", check=False)
        assert proc.returncode == 5, (args, proc.stderr.decode())
        # the name comes again either before dom0 decrypted (and removed) the first copy, and the
        # unpacker refuses to overwrite it, or after, and the shim refuses it: timing decides which
        error = json.loads(proc.stdout)["error"]
        assert "out of order" in error or "served a file twice" in error, (args, error)


@pytest.mark.parametrize("engine", ["restic"])
def test_a_missing_template_is_said_before_any_data_is_read(backed_up, fresh_world: Sim, engine):
    """Issue 13.4: stock restore refuses a qube whose template is neither there nor restored with
    it, --verify-only too, unless --skip-broken or --ignore-missing."""
    setup_qtb(fresh_world, engine, backed_up.repo, recovery_key=backed_up.recovery_key)
    for extra in ((), ("--verify-only",)):
        proc = qtb(fresh_world, "restore", "--qube", "work", "--new-system", *extra, check=False)
        assert proc.returncode == 2 and b"needs template debian-12" in proc.stderr, proc.stderr
    proc = qtb(
        fresh_world, "restore", "--qube", "work", "--new-system", "--skip-broken", "--json", check=False
    )
    assert proc.returncode == 1 and "nothing to restore" in json.loads(proc.stdout)["qubes"]["work"]["error"]
    assert "work" not in fresh_world.digest()["qubes"]


@pytest.mark.parametrize("engine", ["restic"])
def test_another_users_dom0_home_is_said_before_any_data_is_read_and_verify_still_reads_it(
    backed_up, tmp_path: Path, engine
):
    """Stock restore refuses another user's dom0 home only after qtb-pipe's verify pass, and its
    --verify-only leaves that home unread (docs/qubes-facts.md R4)."""
    alice = make_world(tmp_path / "alice", "--bare", "--user", "alice")
    setup_qtb(alice, engine, backed_up.repo, recovery_key=backed_up.recovery_key)
    restore = ("restore", "--qube", "dom0", "--new-system")
    proc = qtb(alice, *restore, check=False)
    assert "dom0's home in this snapshot is user's, and this dom0's user is alice" in one_line_error(proc, 2)
    assert b"pass 1/2" not in proc.stderr
    home = qtb_json(alice, *restore, "--verify-only")["qubes"]["dom0"]
    assert home["verified"] == home["chunks"] > 0  # read and checked, though not restored
    qtb(alice, *restore, "--ignore-username-mismatch")
    restored = next(alice.dom0_home.glob("home-restore-*/dom0-home/user"))  # the backup side's name (R4)
    original = backed_up.world.digest("dom0")["dom0-home"]
    assert {p.relative_to(restored).as_posix() for p in restored.rglob("*") if p.is_file()} == set(original)
    assert all(hashlib.sha256((restored / rel).read_bytes()).hexdigest() == h for rel, h in original.items())
    # --skip-conflicting skips qubes whose names are taken; dom0 is listed in every dom0, its home is not one
    qtb(backed_up.world, "restore", "--qube", "dom0", "--skip-conflicting", "--single-pass")
    assert backed_up.world.digest("dom0", restored_home=True)["dom0-home"] == original


@pytest.mark.parametrize("engine", ["restic"])
def test_dom0_home_served_altered_is_refused(backed_up, engine):
    world = backed_up.world
    install_attacker(world, {"flip": "dom0-home/user.000.enc"})
    assert qtb(world, "verify", backed_up.snapshots["dom0"], check=False).returncode == 5


@pytest.mark.parametrize("engine", ["restic"])
def test_replayed_chunk_and_replayed_snapshot_are_refused(backed_up, engine):
    world = backed_up.world
    old = backed_up.snapshots["work"]
    mutate(world, "work")
    new = qtb_json(world, "backup", "work")["qubes"]["work"]["snapshot"]
    for attack in (
        {"swap": "vm3/private.img.000.enc", "from": old},  # a chunk from an older backup
        {"serve": old},  # the older stream for the newer id
        {"serve": old, "manifest": True},  # ... with its own (genuine) manifest
    ):
        install_attacker(world, attack)
        proc = qtb(world, "verify", new, check=False)
        assert proc.returncode == 5, (attack, proc.stderr.decode())


@pytest.mark.parametrize("engine", ["restic"])
def test_failed_chunk_in_shim_blocks_that_qubes_commit_only(backed_up, engine):
    """qubesd ignores a chunk's scrypt exit status; the driver must not commit such a backup."""
    world = backed_up.world
    mutate(world, "personal", "vault", seed=5)
    env = {"QUBES_SIM_TEST_KILL_SCRYPT_FOR": "vm4/private.img.000"}  # personal's volume
    proc = qtb(world, "backup", "-x", "dom0", "--json", check=False, env=env)
    result = json.loads(proc.stdout)
    assert proc.returncode == 1, proc.stderr.decode()
    assert (
        result["qubes"]["personal"]["status"] == "failed"
        and result["qubes"]["vault"]["status"] == "backed up"
    )
    assert b"1 qube(s) not backed up: personal" in proc.stderr
    latest = qtb_json(world, "list")["qubes"]
    assert latest["personal"]["snapshot"] == backed_up.snapshots["personal"]  # nothing half-done recorded
    assert qtb_json(world, "backup", "-x", "dom0")["qubes"]["personal"]["status"] == "backed up"


@pytest.mark.parametrize("engine", ["restic"])
def test_adapter_dying_midway_leaves_no_complete_snapshot(backed_up, engine):
    world = backed_up.world
    mutate(world, "vault")
    wrapper = world.root / "qubes/backup/usr/local/bin/qtb-adapter"
    real = world.root / "qubes/backup/usr/bin/qtb-adapter"
    # the adapter (and so its engine run) is killed while the stream is flowing
    wrapper.write_text(
        f'#!/bin/bash\nif [ "$1" = store ]; then\n  {real} "$@" <&0 & pid=$!\n'
        "  sleep 0.5; kill -9 $pid; exit 137\nfi\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    before = {s["snapshot"] for s in snapshots(world)}
    proc = qtb(world, "backup", "vault", check=False)
    assert proc.returncode == 1 and b"qvm-backup failed" in proc.stderr
    remove_attacker(world)
    assert {s["snapshot"] for s in snapshots(world)} == before
    assert qtb_json(world, "backup", "vault")["qubes"]["vault"]["status"] == "backed up"


@pytest.mark.parametrize("engine", ["restic"])
def test_a_killed_night_resumes_with_the_qubes_it_did_not_finish(backed_up, engine):
    world = backed_up.world
    mutate(world, "debian-12", "work", "personal", "vault", seed=9)
    night = subprocess.Popen(
        ["qubes-sim", "run", str(world.root), "--", "qtb-pipe", "backup", "-x", "dom0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    for line in night.stderr:  # killed (laptop closed) while the third qube is being backed up
        if b"(3/4)" in line:
            night.kill()
            break
    night.wait()
    night.stdout.close()
    night.stderr.close()
    latest = qtb_json(world, "list")["qubes"]
    done = [
        q
        for q in ("debian-12", "work", "personal", "vault")
        if latest[q]["snapshot"] != backed_up.snapshots[q]
    ]
    assert done == ["debian-12", "work"]  # what finished stays committed
    resumed = qtb_json(world, "backup", "-x", "dom0")
    assert [q for q, r in resumed["qubes"].items() if r["status"] == "backed up"] == ["personal", "vault"]
    assert not list((world.dom0 / "var/lib/qtb-pipe/runs").iterdir())  # the dead run's directory is gone


def test_bad_input_one_line_errors(tmp_path: Path, world: Sim):
    # missing config
    proc = qtb(world, "backup", check=False)
    assert proc.returncode == 3 and proc.stderr.count(b"\n") == 1 and b"qtb-pipe init" in proc.stderr
    setup_qtb(world, "restic", world.qube_home("backup") / "repo")
    snap = qtb_json(world, "backup", "vault")["qubes"]["vault"]["snapshot"]
    # restic's `latest`: here each qube's newest copy (restore latest = --all, latest QUBE = --qube QUBE)
    newest = qtb_json(world, "restore", "latest", "vault", "--verify-only")
    assert list(newest["qubes"]) == ["vault"] and newest["qubes"]["vault"]["snapshot"] == snap
    assert list(qtb_json(world, "verify", "latest")["qubes"]) == ["vault"]
    cases = [
        (("restore", "doesnotexist"), 4),
        (("restore", "bad id!"), 2),
        (("restore", "latest", "vault", "--all"), 2),  # latest QUBE is --qube QUBE
        (("restore", "--all", "--qube", "vault"), 2),
        (("check", "--read-data-subset", "150%"), 2),  # said before the engine is asked
        (("verify", "--read-data-subset", "0/5"), 2),
        (("restore",), 2),
        (("restore", "--all", snap), 2),
        (("restore", "--qube", "nosuch"), 2),
        (("restore", "--all", "--as-of", "2001-01-01"), 4),  # before the first backup
        (("restore", "--all", "--as-of", "yesterday"), 2),
        (("backup", "no-such-qube"), 2),
        (("list", "--qube", "nosuch"), 2),
        (("prune", "--keep-last", "-1"), 2),
    ]
    for args, code in cases:
        proc = qtb(world, *args, check=False)
        assert proc.returncode == code, (args, proc.stderr)
        assert proc.stderr.count(b"\n") == 1 and b"Traceback" not in proc.stderr, (args, proc.stderr)
        if code == 4 and args[1] == "doesnotexist":
            assert b"qtb-pipe list" in proc.stderr  # says what to do next
    # wrong secret: the manifest does not verify
    other = make_world(tmp_path / "other", "--bare")
    setup_qtb(other, "restic", world.qube_home("backup") / "repo", recovery_key="ab" * 32)
    proc = qtb(other, "restore", snap, "--new-system", check=False)
    assert proc.returncode == 5 and b"manifest" in proc.stderr
    # a damaged dom0 record stops the commands that use the catalog, and says which file
    record = next((world.dom0 / "var/lib/qtb-pipe/snapshots").glob("*.json"))
    good = record.read_bytes()
    record.write_text("{not json")
    for args in (("list",), ("verify",), ("backup", "vault")):
        proc = qtb(world, *args, check=False)
        assert proc.returncode == 3 and record.name.encode() in proc.stderr, (args, proc.stderr)
    record.write_bytes(good)
    # backup qube not running, not to be started
    config = world.dom0 / "etc/qtb-pipe/config.toml"
    config.write_text(config.read_text().replace("start_backup_qube = true", "start_backup_qube = false"))
    world.run("qvm-shutdown", "backup", check=True)
    proc = qtb(world, "backup", "--full", "vault", check=False)
    assert proc.returncode == 6 and b"not running" in proc.stderr
    world.run("qvm-start", "backup", check=True)
    # adapter missing in the backup qube
    (world.root / "qubes/backup/usr/bin/qtb-adapter").unlink()
    proc = qtb(world, "list", check=False)
    assert proc.returncode == 6 and b"not installed" in proc.stderr


def test_shim_install_round_trip_in_world(world: Sim):
    before = sorted(p.relative_to(world.dom0).as_posix() for p in world.dom0.rglob("*"))
    assert qtb_json(world, "install-shim")["action"] == "installed"
    assert json.loads(qtb(world, "shim-status", "--json").stdout)["active"]
    assert qtb_json(world, "install-shim")["action"] == "unchanged"  # twice: no-op
    assert qtb_json(world, "uninstall-shim")["removed"] is True
    after = sorted(p.relative_to(world.dom0).as_posix() for p in world.dom0.rglob("*"))
    assert after == before
    assert qtb(world, "shim-status", check=False).returncode == 7


@pytest.mark.slow
def test_remote_repositories_round_trip(world: Sim, fresh_world: Sim, request, tmp_path):
    """Off-site: restic on a REST server and borg over ssh, both on loopback, restored byte for byte."""
    key = qtb_json(world, "init", "--backup-qube", "backup")["recovery_key"]
    qtb_json(fresh_world, "init", "--backup-qube", "backup", "--recovery-key", key)
    rest, sshd = request.getfixturevalue("rclone_rest_server"), request.getfixturevalue("sshd_server")
    remotes = {
        "restic": (rest.url + "/qtb/", []),
        "borg": (sshd.repo(tmp_path / "borg-repo"), ["--set", f"rsh={sshd.rsh}"]),
    }
    for w in (world, fresh_world):
        qtb(w, "install-shim")
    for round_no, (engine, (repo, settings)) in enumerate(remotes.items()):
        for w in (world, fresh_world):
            adapter_init(w, engine, repo, *settings)
        qtb_json(world, "backup", "--engine", engine, "--full", "debian-12", "work")
        flags = ["--rename-conflicting"] if round_no else []  # second round: the names are taken
        qtb(fresh_world, "restore", "--all", "--engine", engine, "--new-system", "--ignore-missing", *flags)
        got = fresh_world.digest()["qubes"]
        want = world.digest("debian-12", "work")["qubes"]
        for name in ("debian-12", "work"):
            restored = f"{name}-1" if round_no else name
            assert got[restored]["files"] == want[name]["files"], (engine, name)


def test_retention_per_qube_never_removes_a_qubes_only_copy(backed_up, engine):
    """The case of issue 10: runs of different qubes, then a prune that must keep every qube's copy."""
    world = backed_up.world  # the fixture's full backup holds the only copy of personal and debian-12
    qtb_json(world, "backup", "--full", "work", "vault")
    qtb_json(world, "backup", "--full", "-x", "personal", "-x", "debian-12", "-x", "dom0")
    qtb_json(world, "backup", "--full", "vault")
    dry = qtb_json(world, "prune", "--dry-run")  # the default retention of the config
    assert set(dry["qubes"]) == set(ALL) and all(q["remaining"] for q in dry["qubes"].values())
    result = qtb_json(world, "prune", "--keep-last", "1")
    assert all(len(q["remaining"]) == 1 for q in result["qubes"].values())
    latest = qtb_json(world, "list")["qubes"]
    assert set(latest) == set(ALL) and all(q["in_repository"] for q in latest.values())
    records = {p.stem.split("-", 1)[1] for p in (world.dom0 / "var/lib/qtb-pipe/snapshots").glob("*.json")}
    assert records == {q["snapshot"] for q in latest.values()}  # dom0 forgets what was pruned
    # qubes deleted from dom0 are no longer protected: their copies age out by the repository's
    # periods. Today is among the config's keep_daily 7 days, so they stay for now...
    qubes_xml = world.dom0 / "var/lib/qubes/qubes.xml"
    from qubes_sim.world import parse_qubes_xml, render_qubes_xml

    gone = {"personal", "debian-12"}
    remaining = {n: q for n, q in parse_qubes_xml(qubes_xml.read_bytes()).items() if n not in gone}
    qubes_xml.write_bytes(render_qubes_xml(remaining))
    dry = qtb_json(world, "prune", "--keep-last", "1", "--dry-run")
    assert dry["removed"] == [] and all(dry["qubes"][name]["remaining"] for name in gone)
    # ...and with only keep-last 1 (flags of 0 switch the config's rules off), the newest snapshot
    # is the one period: theirs are older, they go
    off = ("--keep-daily", "0", "--keep-weekly", "0", "--keep-monthly", "0")
    dry = qtb_json(world, "prune", "--keep-last", "1", *off, "--dry-run")
    assert sorted(dry["removed"]) == sorted(latest[name]["snapshot"] for name in gone)
    for name, q in dry["qubes"].items():
        assert q["exists_in_dom0"] is (name not in gone) and bool(q["remaining"]) is (name not in gone)
    text = qtb(world, "prune", "--keep-last", "1", *off, "--dry-run").stdout.decode()
    assert "personal" in text and "deleted from dom0: its copies age out by the rules" in text
    assert all(f"would remove: {snapshot}\n" in text for snapshot in dry["removed"])  # the ids (12.7)
    assert qtb_json(world, "check")["ok"]


def test_errors_under_json_are_one_json_object_on_stdout(world: Sim):
    for args, code in ((("list", "--json"), 3), (("prune", "--keep-daily", "-1", "--json"), 2)):
        proc = qtb(world, *args, check=False)
        error = json.loads(proc.stdout)
        assert proc.returncode == code == error["exit_code"], proc.stderr
        assert error["error"] and error["hint"] and set(error) == {"error", "exit_code", "hint"}
        assert proc.stderr.decode().count("\n") == 1  # and the one line on stderr, as without --json


def test_config_check_fails_where_backup_would_refuse(world: Sim):
    setup_qtb(world, "restic", world.qube_home("backup") / "repo")
    assert qtb_json(world, "config", "check")["errors"] == []
    config = world.dom0 / "etc/qtb-pipe/config.toml"
    config.write_text(config.read_text().replace("include = []", 'include = ["work", "nosuch"]'))
    proc = qtb(world, "config", "check", "--json", check=False)
    result = json.loads(proc.stdout)
    assert proc.returncode == 3 == result["exit_code"]
    assert result["errors"] == ["nosuch is in the config but no such qube exists"]
    assert result["included"] == ["work"]  # what backup would use
    plan = {"status": "to back up", "why": "no copy yet", "estimated_bytes": None}  # no copy: no estimate
    assert result["qubes"] == {"work": plan}
    assert qtb(world, "backup", check=False).returncode == 2  # which backup indeed refuses
    config.write_text(config.read_text().replace('backup_qube = "backup"', 'backup_qube = "backpu"'))
    proc = qtb(world, "config", "check", check=False)
    assert proc.returncode == 3 and b"error: backup qube backpu does not exist" in proc.stdout


# The README's "Install on Qubes" steps, in its order, as it writes them (sudo aside: the emulated
# dom0 has one user); each must be in the README verbatim, so that the page and this test agree.
README_FIRST_RUN = (
    ("backup", "qtb-adapter init --engine restic --repo ~/repo --generate-password"),
    ("dom0", "sudo qtb-pipe init --backup-qube backup"),
    ("dom0", "sudo qtb-pipe install-shim"),
    ("dom0", "qtb-pipe shim-status"),
    ("dom0", "qtb-pipe config check"),
    ("dom0", "qtb-pipe backup"),
    ("dom0", "qtb-pipe verify"),
)


def test_the_readmes_first_run_works_as_written(world: Sim):
    """12.1: a fresh backup qube and a fresh dom0, the README's commands in order, nothing edited by
    hand; the adapter answers dom0's init (no warning), every qube is backed up and verified."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    install = readme[readme.index("## Install on Qubes") : readme.index("## Everyday use")]
    at = [install.index(command) for _, command in README_FIRST_RUN]
    assert at == sorted(at), "the README lists these steps in another order"
    said = {}
    for where, command in README_FIRST_RUN:
        line = command.removeprefix("sudo ")
        done = world.run("sh", "-c", line, inside=None if where == "dom0" else where, env=QTB_ENV)
        assert done.returncode == 0, (command, done.stderr.decode())
        said[line] = done
    assert b"warning" not in said["qtb-pipe init --backup-qube backup"].stderr  # the adapter answered
    password = world.qube_home("backup") / ".config/qtb-pipe/restic.password"
    assert password.stat().st_mode & 0o777 == 0o600
    verified = said["qtb-pipe verify"].stdout.decode()
    assert all(re.search(rf"^  {q} +[0-9]+/[0-9]+ chunks verified", verified, re.M) for q in ALL), verified
    logged = qtb(world, "list", "-v").stderr.decode()  # -v: every command line dom0 runs
    assert (
        "qtb-pipe: + qvm-run --pass-io --no-autostart backup 'qtb-adapter list --json --engine restic'"
        in logged
    )


def test_init_checks_the_backup_qube_and_a_second_init_keeps_the_secret(world: Sim):
    proc = qtb(world, "init", "--backup-qube", "backpu", check=False)
    assert proc.returncode == 6 and b"no qube named 'backpu'" in proc.stderr
    assert not (world.dom0 / "etc/qtb-pipe").exists() or not any((world.dom0 / "etc/qtb-pipe").iterdir())
    # `sudo qtb-pipe init` (the README's step): the user whose timer runs the backups owns the secret
    # and dom0's state directory (records, run directories), which a non-root user could not create
    done = qtb(world, "init", "--backup-qube", "backup", "--json", env={"SUDO_UID": "4321"})
    first = json.loads(done.stdout)
    # no qtb-adapter set up in the backup qube yet: said (12.1), not refused (dom0 may come first)
    assert first["adapter"] is None and "qtb-adapter" in first["warnings"][0]
    text = qtb(world, "init", "--backup-qube", "backup").stderr  # again, as text: the secret is kept
    assert b"warning: " in text and b"README, step 1" in text
    state = world.dom0 / "var/lib/qtb-pipe"
    if os.geteuid() == 0:
        assert {(world.dom0 / "etc/qtb-pipe/secret").stat().st_uid, state.stat().st_uid} == {4321}
    assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700
    secret = (world.dom0 / "etc/qtb-pipe/secret").read_bytes()
    config = world.dom0 / "etc/qtb-pipe/config.toml"
    config.write_text(config.read_text().replace("exclude = []", 'exclude = ["personal"]'))
    again = qtb_json(world, "init", "--backup-qube", "backup", "--engine", "borg")  # no --force needed
    assert again["secret_kept"] is True and again["recovery_key"] is None and first["recovery_key"]
    assert (world.dom0 / "etc/qtb-pipe/secret").read_bytes() == secret
    assert 'engine = "borg"' in config.read_text() and 'exclude = ["personal"]' in config.read_text()
    # a re-run changes what it is given and nothing else (the defaults are for the first run only)
    qtb_json(world, "init", "--backup-qube", "vault")
    assert 'engine = "borg"' in config.read_text() and 'backup_qube = "vault"' in config.read_text()
    qtb_json(world, "init", "--engine", "restic")
    assert 'engine = "restic"' in config.read_text() and 'backup_qube = "vault"' in config.read_text()
    qtb_json(world, "init", "--backup-qube", "backup")
    proc = qtb(world, "init", "--backup-qube", "backup", "--recovery-key", first["recovery_key"], check=False)
    assert proc.returncode == 3 and b"--force" in proc.stderr  # replacing the secret needs --force


def test_version_names_every_part_and_what_it_could_not_ask(backed_up, engine, fresh_world: Sim):
    """12.4: the driver, the shim (and whether it is active) and, from the backup qube, the adapter
    and its engine; unconfigured, the dom0 part still comes, with exit 3."""
    found = qtb_json(backed_up.world, "version")
    assert (found["qtb_pipe"], found["shim_version"]) == (qtb_pipe.__version__, SHIM_VERSION)
    assert found["shim"]["active"] and found["shim"]["up_to_date"]
    adapter = found["adapter"]
    assert (adapter["qube"], adapter["engine"], adapter["adapter_version"]) == (
        "backup",
        engine,
        qtb_adapters.__version__,
    )
    assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", adapter["engine_version"])
    assert adapter["engine_version"] in adapter["engine_line"] and engine in adapter["engine_line"]
    text = qtb(backed_up.world, "version").stdout.decode()
    assert f"qtb-adapter {qtb_adapters.__version__}, {engine} {adapter['engine_version']}" in text
    assert f"scrypt shim {SHIM_VERSION}" in text and "shim active" in text
    proc = qtb(fresh_world, "version", "--json", check=False)  # never initialised
    answer = json.loads(proc.stdout)
    assert proc.returncode == 3 == answer["exit_code"] and answer["adapter"] is None
    assert answer["shim"]["installed"] is False and answer["qtb_pipe"] == qtb_pipe.__version__
    assert "qtb-pipe init" in proc.stderr.decode()
    assert b"shim NOT active" in qtb(fresh_world, "version", check=False).stdout
