"""qtb-adapter against real restic and real borg, local and over the network (loopback).

Targets: restic (>= 0.17 path: restic runs our filter), restic-stdin (the path older restic uses:
our filter feeds `restic backup --stdin`), restic-old (the oldest supported restic, 0.14), restic-rest
(rclone serve restic), borg (import-tar, the default; the system's borg, 1.2.4 on Debian 12, the
oldest supported), borg-new (the newest supported borg, 1.4), borg-create (`create
--content-from-command`), borg-ssh (import-tar to our own sshd).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest_remote import (
    ENGINE_PASSWORD,
    AdapterHome,
    engine_taking_stream,
    producer_process,
    rclone_rest_server,
    spawned,
    sshd_server,
)
from streamtools import (
    Stream,
    V4Backup,
    expected_members,
    make_backup,
    members_by_tar,
    tar2qfile_like_names,
    write_stream,
)

__all__ = ["rclone_rest_server", "spawned", "sshd_server"]  # fixtures, found by pytest here

# The default store methods and the oldest and newest supported engines in the fast tier; the other
# methods and the remote repositories in the slow one.
TARGETS = [
    "restic",
    "borg",
    "restic-old",
    "borg-new",
    *(pytest.param(t, marks=pytest.mark.slow) for t in ("restic-stdin", "restic-rest")),
    *(pytest.param(t, marks=pytest.mark.slow) for t in ("borg-create", "borg-ssh")),
]
# The binaries `make setup` installs next to the project's tools (scripts/setup.sh); a variable names
# another one. A missing one fails the test: a skip would let the oldest engine go untested.
VERSIONED_BINARIES = {
    "restic-old": ("QTB_TEST_OLD_RESTIC", "restic-0.14", "0.14."),
    "borg-new": ("QTB_TEST_NEW_BORG", "borg-1.4", "1.4."),
}


def versioned_binary(target: str) -> str:
    """The engine binary a versioned target runs, checked to be the version it stands for."""
    variable, default, version = VERSIONED_BINARIES[target]
    binary = os.environ.get(variable) or shutil.which(default)
    assert binary, f"{default} not found on PATH: run `make setup` (or set {variable})"
    shown = subprocess.run([binary, "version" if "restic" in target else "--version"], capture_output=True)
    words = shown.stdout.decode().split()  # "restic 0.14.0 compiled…", "borg-1.4 1.4.5" (its argv[0])
    assert len(words) > 1 and words[1].startswith(version), f"{binary} is not {version}x: {shown.stdout!r}"
    return binary


@dataclass
class Target:
    name: str
    engine: str
    home: AdapterHome
    repo: str
    rsh: str | None = None

    def engine_objects(self) -> list[str]:
        """Every snapshot/archive in the repository, asked from the engine itself, not from us."""
        env = dict(self.home.env)
        if self.engine == "restic":
            binary = versioned_binary(self.name) if self.name == "restic-old" else "restic"
            argv = [binary, "--repo", self.repo, "--password-file", str(self.home.password_file), "--json"]
            done = subprocess.run([*argv, "snapshots"], env=env, capture_output=True, text=True, check=True)
            return [s["id"] for s in json.loads(done.stdout or "[]") or []]
        env["BORG_PASSPHRASE"] = ENGINE_PASSWORD
        if self.rsh:
            env["BORG_RSH"] = self.rsh
        borg = versioned_binary(self.name) if self.name == "borg-new" else "borg"
        argv = [borg, "list", "--json", self.repo]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
        return [a["name"] for a in json.loads(done.stdout)["archives"]]


@pytest.fixture(params=TARGETS)
def target(request, tmp_path: Path) -> Target:
    name = request.param
    home = AdapterHome(tmp_path / "qube")
    if name.startswith("restic"):
        settings = ["store_method=stdin"] if name == "restic-stdin" else []
        if name == "restic-rest":
            server = request.getfixturevalue("rclone_rest_server")
            repo = f"{server.url}/{tmp_path.name}/"
        else:
            repo = str(tmp_path / "repo")
        if name == "restic-old":
            settings = [f"binary={versioned_binary(name)}"]
        home.init("restic", repo, *settings)
        return Target(name, "restic", home, repo)
    settings = ["store_method=create"] if name == "borg-create" else []
    if name == "borg-new":
        settings.append(f"binary={versioned_binary(name)}")
    rsh = None
    if name == "borg-ssh":
        server = request.getfixturevalue("sshd_server")
        repo, rsh = server.repo(tmp_path / "repo"), server.rsh
        settings.append(f"rsh={rsh}")
    else:
        repo = str(tmp_path / "repo")
    home.init("borg", repo, *settings)
    return Target(name, "borg", home, repo, rsh)


@pytest.fixture(scope="module")
def v4(tmp_path_factory) -> tuple[V4Backup, Stream]:
    tmp = tmp_path_factory.mktemp("v4")
    backup = make_backup(
        11, volumes={"vm1/private.img": 900_000, "vm2/root.img": 400_000}, chunk_bytes=256 * 1024
    )
    return backup, write_stream(backup, tmp / "stream", tmp / "work")


def new_run() -> str:
    return "run" + secrets.token_hex(6)


def store_and_commit(home: AdapterHome, backup: V4Backup, stream: Stream) -> str:
    run = new_run()
    home.ok("store", "--run", run, stdin=stream.path)
    return home.ok("commit", "--run", run, "--json", stdin=backup.manifest()).json()["id"]


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert re.match(r"qtb-adapter: error \(exit [0-9]+\): ", lines[0])
    return lines[0]


def test_store_pending_commit_dump_roundtrip(target: Target, v4, tmp_path: Path) -> None:
    backup, stream = v4
    home = target.home
    run = new_run()
    stored = home.ok("store", "--run", run, "--json", stdin=stream.path).json()
    assert stored["state"] == "pending"
    assert stored["stream_bytes"] == stream.size
    pending = home.ok("pending", "--run", run, "--json").json()
    assert pending["run"] == run
    assert pending["stream_bytes"] == stream.size
    assert [(m["name"], m["size"]) for m in pending["members"]] == [(n, len(d)) for n, d in backup.members()]

    # Pending is not a backup: not listed by default, not dumpable.
    assert home.snapshots() == []
    assert [s["state"] for s in home.snapshots(pending=True)] == ["pending"]
    refused = home.run("dump", stored["id"])
    assert refused.returncode == 4 and refused.stdout == b""
    one_error_line(refused.stderr)

    record = home.home / f".local/state/qtb-pipe/pending/{target.engine}/{run}.json"
    kept_record = record.read_bytes()  # to replay "the commit was saved, but its record stayed"
    committed = home.ok("commit", "--run", run, "--json", stdin=backup.manifest(target.engine)).json()
    assert committed["id"] == stored["id"]
    [listed] = home.snapshots()
    assert listed["state"] == "complete"
    assert listed["backup_id"] == backup.backup_id
    assert listed["qubes"] == backup.qubes
    assert listed["stream_bytes"] == stream.size
    assert listed["added_bytes"] > 0
    assert home.ok("manifest", listed["id"]).stdout == backup.manifest(target.engine)

    dumped = tmp_path / "dumped"
    home.ok_to_file(dumped, "dump", listed["id"])
    assert members_by_tar(dumped, tmp_path / "extract") == expected_members(backup)
    assert members_by_tar(stream.path, tmp_path / "extract") == expected_members(backup)
    assert tar2qfile_like_names(dumped) == [name for name, _ in backup.members()]

    home.dump_read_partly(listed["id"], 4096)

    # A retried commit with the same manifest is fine; the run is no longer pending.
    assert (
        home.ok("commit", "--run", run, "--json", stdin=backup.manifest(target.engine)).json()["id"]
        == listed["id"]
    )
    assert home.run("pending", "--run", run).returncode == 4

    # The same, had the first commit died after the engine saved it but before its record was
    # removed: the first commit object counts, another manifest is refused.
    other = json.loads(backup.manifest(target.engine))
    other["manifest"]["created"] = "2026-11-25T00:00:00Z"
    other_manifest = json.dumps(other, sort_keys=True, separators=(",", ":")).encode()
    for manifest, code in ((backup.manifest(target.engine), 0), (other_manifest, 1)):
        record.write_bytes(kept_record)
        retried = home.run("commit", "--run", run, "--json", stdin=manifest)
        assert retried.returncode == code, retried.stderr
        if code == 0:
            assert retried.json()["id"] == listed["id"]
        else:
            assert "already committed" in one_error_line(retried.stderr)
    [again] = home.snapshots()
    assert again["id"] == listed["id"]
    assert home.ok("manifest", listed["id"]).stdout == backup.manifest(target.engine)


def _store_interrupted(
    target: Target, stream: Stream, gate: Path, victim: str, spawned: list[subprocess.Popen]
) -> tuple[int, str]:
    """Store with a producer that stalls halfway; kill the engine or qtb-adapter itself meanwhile."""
    producer = producer_process(stream.path, stream.size // 2, "wait", gate)
    store = target.home.popen("store", "--run", new_run(), stdin=producer.stdout)
    spawned += [producer, store]
    producer.stdout.close()
    engine = engine_taking_stream(store)
    os.kill(engine if victim == "engine" else store.pid, signal.SIGKILL)
    gate.touch()
    returncode = store.wait(timeout=60)
    stderr = store.stderr.read().decode()
    producer.wait(timeout=30)
    if victim == "adapter":
        deadline = time.monotonic() + 30  # the engine dies with it (parent-death signal)
        while Path(f"/proc/{engine}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return returncode, stderr


def test_incomplete_bad_or_interrupted_stores_leave_nothing(
    target: Target, v4, tmp_path: Path, spawned
) -> None:
    backup, stream = v4
    home = target.home
    data = stream.path.read_bytes()

    producer = producer_process(stream.path, stream.spans[4].start + 5000, "kill")
    spawned.append(producer)
    killed = home.run("store", "--run", new_run(), stdin=producer.stdout.fileno())
    producer.stdout.close()
    producer.wait()
    assert killed.returncode == 7, killed.stderr
    assert "ends inside member" in one_error_line(killed.stderr)

    cut = home.run("store", "--run", new_run(), stdin=data[: stream.spans[-2].member_end])
    assert cut.returncode == 7
    assert "without end-of-archive blocks" in one_error_line(cut.stderr)

    garbage = home.run("store", "--run", new_run(), stdin=os.urandom(300_000))
    assert garbage.returncode == 7
    one_error_line(garbage.stderr)

    returncode, stderr = _store_interrupted(target, stream, tmp_path / "gate1", "engine", spawned)
    assert returncode == 1
    assert "killed by signal 9" in one_error_line(stderr)

    returncode, _ = _store_interrupted(target, stream, tmp_path / "gate2", "adapter", spawned)
    assert returncode == -signal.SIGKILL

    objects = target.engine_objects()
    if target.name in ("restic-stdin", "restic-old"):
        # restic < 0.17 reads a plain --stdin: if qtb-adapter is SIGKILLed, restic can see EOF
        # before its parent-death signal lands and save a cut stream. It stays PENDING forever.
        assert len(objects) <= 1
        assert home.snapshots() == []
        home.ok("drop-pending", "--all")
    assert target.engine_objects() == []
    assert home.snapshots(pending=True) == []
    check = home.run("check", "--json")
    assert check.returncode == 0, check.stderr
    assert check.json()["ok"] is True
    store_and_commit(home, backup, stream)
    assert len(home.snapshots()) == 1
