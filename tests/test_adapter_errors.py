"""Bad situations give one line on stderr and the documented exit code, and store nothing complete."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
from pathlib import Path

import pytest
from conftest_remote import VENV_BIN, AdapterHome, engine_taking_stream, producer_process, spawned
from qtb_adapters.base import version_tuple
from streamtools import Stream, V4Backup, make_backup, write_stream

__all__ = ["spawned"]  # a fixture, found by pytest here

# The exit codes of docs/design.md, spelled out (not imported) so that the contract is what is tested.
EXIT_USAGE = 2
EXIT_NO_REPO = 3
EXIT_UNKNOWN = 4
EXIT_PASSWORD = 5
EXIT_LOCKED = 6
EXIT_BAD_INPUT = 7
EXIT_ENGINE = 8
EXIT_SPACE = 9


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert re.match(r"qtb-adapter: error \(exit [0-9]+\): ", lines[0])
    return lines[0]


def new_run() -> str:
    return "run" + secrets.token_hex(6)


@pytest.fixture(scope="module")
def v4(tmp_path_factory) -> tuple[V4Backup, Stream]:
    tmp = tmp_path_factory.mktemp("v4")
    backup = make_backup(21, volumes={"vm1/private.img": 300_000}, chunk_bytes=128 * 1024)
    return backup, write_stream(backup, tmp / "stream", tmp / "work")


def fake_engine(directory: Path, name: str, version_line: str) -> Path:
    """An engine binary that only tells its version: version detection, not an engine mock."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / name
    script.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    script.chmod(0o755)
    return directory


def test_usage_errors_are_exit_2(tmp_path: Path) -> None:
    home = AdapterHome(tmp_path)
    for args in (["store"], ["frobnicate"], ["dump"], ["prune", "--keep-last", "x"]):
        result = home.run(*args)
        assert result.returncode == EXIT_USAGE, args
        one_error_line(result.stderr)


def test_no_config_is_exit_3(tmp_path: Path) -> None:
    home = AdapterHome(tmp_path)
    for args in (["store", "--run", new_run()], ["list"], ["dump", "abcdef12"], ["check"]):
        result = home.run(*args, stdin=b"")
        assert result.returncode == EXIT_NO_REPO, args
        assert "run `qtb-adapter init` first" in one_error_line(result.stderr)


@pytest.mark.parametrize("engine", ["restic", "borg"])
def test_missing_repository_is_exit_3(engine: str, tmp_path: Path, v4) -> None:
    home = AdapterHome(tmp_path)
    home.init(engine, str(tmp_path / "repo"))
    home.edit_config(str(tmp_path / "repo"), str(tmp_path / "no-such-repo"))
    for args in (["list"], ["store", "--run", new_run()]):
        result = home.run(*args, stdin=v4[1].path)
        assert result.returncode == EXIT_NO_REPO, result.stderr
        one_error_line(result.stderr)
    assert not (tmp_path / "no-such-repo").exists()


@pytest.mark.parametrize("engine", ["restic", "borg"])
def test_wrong_password_is_exit_5_and_stores_nothing(engine: str, tmp_path: Path, v4) -> None:
    home = AdapterHome(tmp_path)
    home.init(engine, str(tmp_path / "repo"))
    assert home.ok("init", "--json").json()["created"] is False  # adopting checks the password
    home.password_file.write_text("not the password\n")
    for args in (["store", "--run", new_run()], ["list"], ["init"]):
        result = home.run(*args, stdin=v4[1].path)
        assert result.returncode == EXIT_PASSWORD, result.stderr
        assert "wrong" in one_error_line(result.stderr)
    home.password_file.write_text("correct horse engine staple\n")
    assert home.snapshots(pending=True) == []


def test_unknown_snapshot_and_bad_manifests(tmp_path: Path, v4) -> None:
    backup, stream = v4
    home = AdapterHome(tmp_path)
    home.init("borg", str(tmp_path / "repo"))
    for args in (["dump", "qtb-s-nothing-like-this"], ["manifest", "qtb-s-nothing-like-this"]):
        result = home.run(*args)
        assert result.returncode == EXIT_UNKNOWN and result.stdout == b""
        one_error_line(result.stderr)
    assert home.run("dump", "../../etc").returncode == EXIT_USAGE
    assert home.run("commit", "--run", new_run(), stdin=backup.manifest()).returncode == EXIT_UNKNOWN

    run = new_run()
    home.ok("store", "--run", run, stdin=stream.path)
    spaced = json.dumps(json.loads(backup.manifest())).encode()  # right content, not canonical bytes
    for manifest in (
        b"",
        b"not json",
        b'{"manifest": {}, "seal": "00"}',
        spaced,
        b" " * (16 * 1024 * 1024 + 1),
    ):
        result = home.run("commit", "--run", run, stdin=manifest)
        assert result.returncode == EXIT_BAD_INPUT
        one_error_line(result.stderr)
    other = make_backup(22, volumes={"vm1/private.img": 1000})  # a manifest of another stream
    mismatch = home.run("commit", "--run", run, stdin=other.manifest())
    assert mismatch.returncode == EXIT_BAD_INPUT
    assert "stored" in one_error_line(mismatch.stderr)
    assert home.snapshots() == []  # still nothing complete
    home.ok("commit", "--run", run, stdin=backup.manifest())
    assert len(home.snapshots()) == 1


@pytest.mark.parametrize(
    ("engine", "version_line", "message"),
    [
        ("restic", "restic 0.13.1 compiled with go1.17.6 on linux/amd64", "too old"),
        ("borg", "borg 1.2.3", "too old"),
        ("borg", "borg 2.0.0b14", "not supported"),
    ],
)
def test_engine_too_old_or_too_new_is_exit_8(
    engine: str, version_line: str, message: str, tmp_path: Path
) -> None:
    home = AdapterHome(tmp_path)
    home.init(engine, str(tmp_path / "repo"))
    old = AdapterHome(tmp_path, extra_path=(fake_engine(tmp_path / "fakebin", engine, version_line),))
    for args in (["store", "--run", new_run()], ["list"]):
        result = old.run(*args, stdin=b"")
        assert result.returncode == EXIT_ENGINE
        assert message in one_error_line(result.stderr)


def test_engine_missing_is_exit_8(tmp_path: Path) -> None:
    home = AdapterHome(tmp_path)
    home.init("restic", str(tmp_path / "repo"))
    # qtb-adapter by its full path, with a PATH where no restic can be found.
    home.env["PATH"] = "/usr/bin:/bin"
    result = home.run("list")
    assert result.returncode == EXIT_ENGINE
    assert "restic not found" in one_error_line(result.stderr)


def _engine_env(home: AdapterHome) -> dict[str, str]:
    return {
        **home.env,
        "RESTIC_PASSWORD_FILE": str(home.password_file),
        "BORG_PASSCOMMAND": f"cat {home.password_file}",
    }


def test_locked_repository_is_exit_6(tmp_path: Path, v4) -> None:
    """A second writer holds the lock: borg store and restic's exclusive operations give 6."""
    borg_home = AdapterHome(tmp_path / "b")
    borg_home.init("borg", str(tmp_path / "b" / "repo"))
    borg_home.edit_config("[borg]", "lock_wait = 1\n\n[borg]")
    holder = subprocess.Popen(
        ["borg", "create", f"{tmp_path / 'b' / 'repo'}::lock-holder", "-"],
        stdin=subprocess.PIPE, env=_engine_env(borg_home), stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for_lock(tmp_path / "b" / "repo" / "lock.exclusive")
        result = borg_home.run("store", "--run", new_run(), stdin=v4[1].path)
        assert result.returncode == EXIT_LOCKED, result.stderr
        assert "locked" in one_error_line(result.stderr)
    finally:
        holder.kill()
        holder.wait()

    restic_home = AdapterHome(tmp_path / "r")
    repo = tmp_path / "r" / "repo"
    restic_home.init("restic", str(repo))
    restic_home.edit_config("[restic]", "lock_wait = 1\n\n[restic]")
    holder = subprocess.Popen(
        [str(VENV_BIN / "restic"), "--repo", str(repo), "backup", "--stdin"],
        stdin=subprocess.PIPE,
        env=_engine_env(restic_home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_lock(repo / "locks")
        result = restic_home.run("check")
        assert result.returncode == EXIT_LOCKED, result.stderr
        assert "locked" in one_error_line(result.stderr)
    finally:
        holder.kill()
        holder.wait()


def _wait_for_lock(path: Path) -> None:
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if path.exists() and (path.is_file() or any(path.iterdir())):
            return
        time.sleep(0.05)
    raise AssertionError(f"no lock appeared at {path}")


@pytest.fixture
def small_filesystem(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("engine", ["restic", "borg"])
def test_full_disk_is_exit_9_and_nothing_complete(
    engine: str, tmp_path: Path, small_filesystem: Path
) -> None:
    home = AdapterHome(tmp_path / "qube")
    home.init(engine, str(small_filesystem / "repo"))
    backup = make_backup(23, volumes={"vm1/private.img": 9_000_000}, chunk_bytes=2 * 1024 * 1024)
    backup.chunks = [(path, os.urandom(len(data))) for path, data in backup.chunks]  # incompressible
    stream = write_stream(backup, tmp_path / "stream", tmp_path / "work")
    result = home.run("store", "--run", new_run(), stdin=stream.path)
    assert result.returncode == EXIT_SPACE, result.stderr
    assert "space" in one_error_line(result.stderr)
    assert home.snapshots() == []


@pytest.mark.parametrize("engine", ["restic", "borg"])
def test_sigterm_during_store_kills_the_engine_and_stores_nothing(
    engine: str, tmp_path: Path, v4, spawned
) -> None:
    """qubes.Backup cancelled: qtb-adapter gets SIGTERM while the engine is taking the stream."""
    home = AdapterHome(tmp_path)
    home.init(engine, str(tmp_path / "repo"))
    producer = producer_process(v4[1].path, v4[1].size // 2, "wait", tmp_path / "gate")
    store = home.popen("store", "--run", new_run(), stdin=producer.stdout)
    spawned += [producer, store]
    producer.stdout.close()
    engine_pid = engine_taking_stream(store)
    store.send_signal(signal.SIGTERM)
    assert store.wait(timeout=60) == 128 + signal.SIGTERM
    assert "terminated by signal 15" in one_error_line(store.stderr.read().decode())
    assert (
        not Path(f"/proc/{engine_pid}").exists() or "zombie" in Path(f"/proc/{engine_pid}/status").read_text()
    )
    (tmp_path / "gate").touch()
    producer.wait(timeout=30)
    assert home.snapshots(pending=True) == []


def test_one_qube_serves_both_engines_chosen_by_engine_option(tmp_path: Path, v4) -> None:
    """The driver names the engine on every call (`--engine`); the config holds one table per engine."""
    backup, stream = v4
    home = AdapterHome(tmp_path)
    home.init("restic", str(tmp_path / "restic-repo"))
    home.init("borg", str(tmp_path / "borg-repo"), "store_method=create")
    for engine in ("restic", "borg"):
        run = new_run()
        home.ok("store", "--run", run, "--engine", engine, stdin=stream.path)
        home.ok("commit", "--run", run, "--engine", engine, stdin=backup.manifest(engine))
    listed = {e: home.ok("list", "--json", "--engine", e).json() for e in ("restic", "borg")}
    assert listed["restic"]["repository"] == str(tmp_path / "restic-repo")
    assert listed["borg"]["snapshots"][0]["id"].startswith("qtb-s-")
    assert home.ok("list", "--json").json()["engine"] == "restic"  # the first one configured
    assert home.run("list", "--engine", "tape").returncode == EXIT_USAGE
    other = AdapterHome(tmp_path / "other")
    other.init("borg", str(tmp_path / "other-repo"))
    result = other.run("list", "--engine", "restic")
    assert result.returncode == EXIT_NO_REPO
    assert "init --engine restic" in one_error_line(result.stderr)


def test_borg_warns_when_free_space_is_below_what_its_commits_need(
    tmp_path: Path, small_filesystem: Path
) -> None:
    home = AdapterHome(tmp_path / "qube")
    init = home.init("borg", str(small_filesystem / "repo")).json()
    (warning,) = init["warnings"]  # borg 1.2 wants ~545 MB free to commit once it has compacting to do
    assert re.search(r"has [0-9]+ MB free; .* less than 54[5-9] MB is free", warning), warning
    checked = home.run("check")
    assert checked.returncode == 0 and checked.stderr == f"qtb-adapter: warning: {warning}\n"
    assert home.ok("check", "--json").json()["warnings"] == [warning]
    roomy = AdapterHome(tmp_path / "roomy")
    assert roomy.init("borg", str(tmp_path / "repo")).json()["warnings"] == []  # the test disk has room
    restic = AdapterHome(tmp_path / "restic")
    assert restic.init("restic", str(small_filesystem / "restic-repo")).json()["warnings"] == []


@pytest.mark.parametrize("engine", ["restic", "borg"])
def test_first_init_as_the_readme_says_and_a_failed_init_leaves_nothing(engine: str, tmp_path: Path) -> None:
    home = AdapterHome(tmp_path / "qube")
    missing = home.home / ".config/qtb-pipe/restic.password"
    args = ("init", "--engine", engine, "--repo", str(tmp_path / "repo"))
    result = home.run(*args, "--password-file", str(missing))
    assert result.returncode == EXIT_NO_REPO and "--generate-password" in one_error_line(result.stderr)
    assert not home.config_path.exists()  # nothing half-written
    # a repository that cannot be created: the config stays absent, the generated password goes too
    (tmp_path / "file").write_text("not a directory")
    result = home.run(
        "init", "--engine", engine, "--repo", str(tmp_path / "file/repo"), "--generate-password"
    )
    assert result.returncode != 0, result.stderr
    one_error_line(result.stderr)
    assert not home.config_path.exists() and not list(home.config_path.parent.glob("*.password"))
    # the README's command on a fresh qube
    done = home.ok(*args, "--generate-password", "--json").json()
    assert (
        done["created"] is True
        and (home.config_path.parent / f"{engine}.password").stat().st_mode & 0o077 == 0
    )
    assert home.snapshots() == []


@pytest.mark.parametrize(
    ("shown", "version"),
    [
        ("restic 0.14.0 compiled with go1.19.8 on linux/amd64", (0, 14, 0)),
        ("restic 0.18.0 compiled with go1.24.4 on linux/amd64", (0, 18, 0)),
        ("borg 1.2.4", (1, 2, 4)),
        ("borg-1.2 1.4.5", (1, 4, 5)),  # borg prints its argv[0]: a borg installed under another name
        ("borg 1.4.0.dev12+g1234", (1, 4, 0)),
        ("borg 2.0", (2, 0, 0)),
        ("no version here 12", None),
    ],
)
def test_the_engine_version_is_the_first_word_that_is_one(shown: str, version: tuple | None) -> None:
    assert version_tuple(shown) == version
