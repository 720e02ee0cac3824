"""`qtb-pipe` end to end on qubes-sim with the real shim, real restic and real borg."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest_remote import rclone_rest_server, sshd_server
from simtools import Sim, make_world

__all__ = ["rclone_rest_server", "sshd_server"]  # fixtures, found by pytest here
TESTS = Path(__file__).parent
ALL = ("debian-12", "work", "personal", "vault", "dom0")
# the driver's own calls to the real scrypt never happen in qtb mode; keep stock defaults otherwise
QTB_ENV = {"QUBES_SIM_TEST_SCRYPT_MAXTIME": None}


def qtb(world: Sim, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = world.run("qtb-pipe", *args, env={**QTB_ENV, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"qtb-pipe {args} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc


def qtb_json(world: Sim, *args: str) -> object:
    return json.loads(qtb(world, *args, "--json").stdout)


def setup_qtb(world: Sim, engine: str, repo: Path, recovery_key: str | None = None) -> str:
    """Configure dom0 (secret, shim) and the backup qube (repository); returns the recovery key."""
    args = ["init", "--backup-qube", "backup", "--engine", engine]
    if recovery_key:
        args += ["--recovery-key", recovery_key]
    result = qtb_json(world, *args)
    qtb(world, "install-shim")
    pw = world.qube_home("backup") / f"{engine}.password"
    pw.write_text("engine password that never leaves the backup qube\n")
    world.run(
        "qtb-adapter",
        "init",
        "--engine",
        engine,
        "--repo",
        str(repo),
        "--password-file",
        str(pw),
        inside="backup",
        check=True,
    )
    return recovery_key or result["recovery_key"]


@pytest.fixture(params=["restic", "borg"])
def engine(request) -> str:
    return request.param


@pytest.fixture
def qtb_world(world: Sim, engine: str) -> tuple[Sim, str, Path]:
    repo = world.qube_home("backup") / f"repo-{engine}"
    key = setup_qtb(world, engine, repo)
    return world, key, repo


def install_attacker(world: Sim, attack: dict) -> None:
    (world.qube_home("backup") / "attack.json").write_text(json.dumps(attack))
    wrapper = world.root / "qubes/backup/usr/local/bin/qtb-adapter"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {TESTS / "attacker.py"} "$@"\n')
    wrapper.chmod(0o755)


def test_backup_restore_whole_world_into_fresh_system(qtb_world, engine: str, fresh_world: Sim):
    world, key, repo = qtb_world
    summary = qtb_json(world, "backup")
    assert summary["engine"] == engine and set(summary["qubes"]) == set(ALL)
    assert summary["stream_bytes"] > 0
    setup_qtb(fresh_world, engine, repo, recovery_key=key)
    proc = qtb(fresh_world, "restore", summary["snapshot"], check=False)
    assert proc.returncode == 5 and b"--new-system" in proc.stderr  # no dom0 record: explicit consent
    proc = qtb(fresh_world, "restore", summary["snapshot"], "--new-system")
    assert b"no record of snapshot" in proc.stderr
    assert fresh_world.digest(*ALL, restored_home=True) == world.digest(*ALL)


def test_incremental_backup_list_verify_and_single_qube_restore(qtb_world, engine: str):
    world, _, _ = qtb_world
    first = qtb_json(world, "backup")
    subprocess.run(["qubes-sim", "mutate", str(world.root), "work"], check=True, capture_output=True)
    second = qtb_json(world, "backup", "work", "vault")
    assert second["qubes"] == ["work", "vault"]
    rows = qtb_json(world, "list")
    assert {r["id"] for r in rows} >= {first["snapshot"], second["snapshot"]}
    assert all(r["dom0_record"] and r["state"] == "complete" for r in rows)
    verify = qtb_json(world, "verify", second["snapshot"])
    assert verify["qubes"]["work"]["verified"] == verify["qubes"]["work"]["chunks"] > 0
    # one qube back, next to the current one
    expected = world.digest("work")["qubes"]["work"]["files"]
    qtb(world, "restore", second["snapshot"], "work", "--rename-conflicting")
    assert world.digest("work1")["qubes"]["work1"]["files"] == expected
    qtb(world, "restore", second["snapshot"], "work", "--skip-conflicting")
    assert "work2" not in world.digest()["qubes"]


@pytest.mark.parametrize(
    "attack",
    [
        {"flip": "vm1/root.img.000.enc"},  # a template's root image
        {"flip": "qubes.xml.000.enc"},
        {"flip": "dom0-home/user.000.enc"},
        {"drop": "vm3/private.img.001.enc"},  # a chunk in the middle
        {"drop_last_of": "vm1/root.img"},  # the last chunk of a file
    ],
    ids=["template-root", "qubes-xml", "dom0-home", "drop-middle", "drop-last"],
)
def test_attacking_backup_qube_is_refused(world: Sim, fresh_world: Sim, attack: dict):
    repo = world.qube_home("backup") / "repo"
    key = setup_qtb(world, "restic", repo)
    snap = qtb_json(world, "backup")["snapshot"]
    before = fresh_world.digest()
    setup_qtb(fresh_world, "restic", repo, recovery_key=key)
    install_attacker(fresh_world, attack)
    proc = qtb(fresh_world, "restore", snap, "--new-system", check=False)
    assert proc.returncode == 5, proc.stderr.decode()
    assert b"refused" in proc.stderr or b"did not serve" in proc.stderr
    assert fresh_world.digest() == before  # nothing restored: not even a qube created
    proc = qtb(fresh_world, "verify", snap, "--new-system", check=False)
    assert proc.returncode == 5


def test_replayed_chunk_and_replayed_snapshot_are_refused(world: Sim):
    repo = world.qube_home("backup") / "repo"
    setup_qtb(world, "restic", repo)
    old = qtb_json(world, "backup", "work")["snapshot"]
    subprocess.run(["qubes-sim", "mutate", str(world.root), "work"], check=True, capture_output=True)
    new = qtb_json(world, "backup", "work")["snapshot"]
    for attack in (
        {"swap": "vm3/private.img.000.enc", "from": old},  # a chunk from an older backup
        {"serve": old},  # the older stream for the newer id
        {"serve": old, "manifest": True},
    ):  # ... with its own (genuine) manifest
        install_attacker(world, attack)
        proc = qtb(world, "verify", new, check=False)
        assert proc.returncode == 5, (attack, proc.stderr.decode())


def test_failed_chunk_in_shim_blocks_commit(world: Sim):
    """qubesd ignores a chunk's scrypt exit status; the driver must not commit such a backup."""
    repo = world.qube_home("backup") / "repo"
    setup_qtb(world, "restic", repo)
    proc = qtb(world, "backup", check=False, env={"QUBES_SIM_TEST_KILL_SCRYPT_FOR": "vm4/private.img.000"})
    assert proc.returncode == 1, proc.stderr.decode()
    assert b"nothing was committed" in proc.stderr or b"does not match" in proc.stderr
    assert not [r for r in qtb_json(world, "list") if r["state"] == "complete"]
    assert qtb_json(world, "backup")["snapshot"]  # the next backup works


def test_adapter_dying_midway_leaves_no_complete_snapshot(world: Sim):
    repo = world.qube_home("backup") / "repo"
    setup_qtb(world, "restic", repo)
    wrapper = world.root / "qubes/backup/usr/local/bin/qtb-adapter"
    real = world.root / "qubes/backup/usr/bin/qtb-adapter"
    # the adapter (and so its engine run) is killed while the stream is flowing
    wrapper.write_text(
        f'#!/bin/bash\nif [ "$1" = store ]; then\n  {real} "$@" <&0 & pid=$!\n'
        "  sleep 0.5; kill -9 $pid; exit 137\nfi\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    proc = qtb(world, "backup", check=False)
    assert proc.returncode == 1 and b"qvm-backup failed" in proc.stderr
    wrapper.unlink()
    assert not [r for r in qtb_json(world, "list") if r["state"] == "complete"]
    assert qtb_json(world, "backup")["snapshot"]


def test_bad_input_one_line_errors(tmp_path: Path, world: Sim):
    # missing config
    proc = qtb(world, "backup", check=False)
    assert proc.returncode == 3 and proc.stderr.count(b"\n") == 1 and b"qtb-pipe init" in proc.stderr
    repo = world.qube_home("backup") / "repo"
    setup_qtb(world, "restic", repo)
    qtb_json(world, "backup", "vault")
    cases = [
        (("restore", "doesnotexist"), 4),
        (("restore", "bad id!"), 2),
        (("backup", "no-such-qube"), 2),
    ]
    for args, code in cases:
        proc = qtb(world, *args, check=False)
        assert proc.returncode == code, (args, proc.stderr)
        assert proc.stderr.count(b"\n") == 1 and b"Traceback" not in proc.stderr
        if code == 4:
            assert b"qtb-pipe list" in proc.stderr  # says what to do next
    # wrong secret: the manifest does not verify
    other = make_world(tmp_path / "other", "--bare")
    setup_qtb(other, "restic", repo, recovery_key="ab" * 32)
    snap = qtb_json(world, "list")[0]["id"]
    proc = qtb(other, "restore", snap, "--new-system", check=False)
    assert proc.returncode == 5 and b"manifest" in proc.stderr
    # backup qube not running, not to be started
    config = world.dom0 / "etc/qtb-pipe/config.toml"
    config.write_text(config.read_text().replace("start_backup_qube = true", "start_backup_qube = false"))
    world.run("qvm-shutdown", "backup", check=True)
    proc = qtb(world, "backup", check=False)
    assert proc.returncode == 6 and b"not running" in proc.stderr
    world.run("qvm-start", "backup", check=True)
    # adapter missing in the backup qube
    (world.root / "qubes/backup/usr/bin/qtb-adapter").unlink()
    proc = qtb(world, "list", check=False)
    assert proc.returncode == 6 and b"not installed" in proc.stderr


def test_shim_install_round_trip_in_world(world: Sim):
    before = sorted(p.relative_to(world.dom0).as_posix() for p in world.dom0.rglob("*"))
    qtb(world, "install-shim")
    assert json.loads(qtb(world, "shim-status", "--json").stdout)["active"]
    qtb(world, "install-shim")  # twice: no-op
    qtb(world, "uninstall-shim")
    after = sorted(p.relative_to(world.dom0).as_posix() for p in world.dom0.rglob("*"))
    assert after == before
    assert qtb(world, "shim-status", check=False).returncode == 7


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
        pw = w.qube_home("backup") / "remote.password"
        pw.write_text("remote engine password\n")
    for round_no, (engine, (repo, settings)) in enumerate(remotes.items()):
        for w in (world, fresh_world):
            pw = w.qube_home("backup") / "remote.password"
            w.run(
                "qtb-adapter",
                "init",
                "--engine",
                engine,
                "--repo",
                repo,
                "--password-file",
                str(pw),
                *settings,
                inside="backup",
                check=True,
            )
        snap = qtb_json(world, "backup", "--engine", engine, "debian-12", "work")["snapshot"]
        qtb(fresh_world, "restore", snap, "--engine", engine, "--new-system", "--rename-conflicting")
        got = fresh_world.digest()["qubes"]
        want = world.digest("debian-12", "work")["qubes"]
        for name in ("debian-12", "work"):
            restored = f"{name}1" if round_no else name  # second round: the names are taken
            assert got[restored]["files"] == want[name]["files"], (engine, name)


def test_prune_keeps_by_policy_and_check_passes(world: Sim):
    repo = world.qube_home("backup") / "repo"
    setup_qtb(world, "borg", repo)
    snaps = [qtb_json(world, "backup", "vault")["snapshot"] for _ in range(3)]
    dry = qtb_json(world, "prune", "--keep-last", "1", "--dry-run")
    assert dry["dry_run"] and set(dry["removed"]) == set(snaps[:2])
    assert {r["id"] for r in qtb_json(world, "list")} == set(snaps)  # a dry run changes nothing
    result = qtb_json(world, "prune", "--keep-last", "1")
    assert set(result["removed"]) == set(snaps[:2]) and result["kept"] == [snaps[2]]
    assert [r["id"] for r in qtb_json(world, "list")] == [snaps[2]]
    records = sorted(p.name for p in (world.dom0 / "var/lib/qtb-pipe/snapshots").iterdir())
    assert records == [f"borg-{snaps[2]}.json"]  # dom0 forgets what was pruned
    assert qtb_json(world, "check")["ok"]
    qtb(world, "verify")  # the latest, end to end
