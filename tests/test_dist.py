"""`make dist`: the release is what it says (reproducible dom0 tarball, an RPM with only dom0's files,
sums that check), and the dom0 installer leaves dom0 as it was when it removes itself."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP / "scripts"))
import dist  # noqa: E402 - scripts/ is not a package


@pytest.fixture(scope="module")
def built() -> Path:
    subprocess.run([sys.executable, str(TOP / "scripts/dist.py")], check=True, capture_output=True, cwd=TOP)
    return TOP / "dist"


def test_dom0_tarball_is_the_same_bytes_from_the_same_commit(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    first, second = dist.dom0_tarball(a, "9.9"), dist.dom0_tarball(b, "9.9")
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        names = tar.getnames()
        assert all(m.uid == 0 and m.mtime == dist.commit_time() for m in tar.getmembers())
    assert "qtb-pipe-dom0-9.9/scrypt_shim/shim.py" in names
    assert not [n for n in names if n.split("/")[1] in ("adapters", "qubes_sim", "tests", "benchmarks")]


def test_rpm_holds_dom0_code_shim_units_and_docs_and_nothing_else(built: Path):
    (rpm,) = built.glob("*.rpm")
    files = set(
        subprocess.run(["rpm", "-qlp", str(rpm)], capture_output=True, text=True, check=True).stdout.split()
    )
    code = {
        f"/usr/lib/qtb-pipe/{p}" for p in dist.tracked(("qtb_pipe/", "scrypt_shim/")) if p.endswith(".py")
    }
    docs = {f"/usr/share/doc/qtb-pipe/{p}" for p in dist.tracked(("docs/", "README.md")) if p.endswith(".md")}
    units = {
        f"/usr/lib/systemd/system/qtb-pipe-{job}@.{kind}" for job in JOBS for kind in ("service", "timer")
    }
    programs = {"/usr/bin/qtb-pipe", "/usr/libexec/qtb-pipe/notify-failure"}
    folders = {f for f in files if not Path(f).suffix and f not in programs}  # directories the package owns
    assert files - folders == code | docs | units | programs
    assert all(
        f.startswith(("/usr/lib/qtb-pipe", "/usr/share/doc/qtb-pipe", "/usr/libexec/qtb-pipe"))
        for f in folders
    )
    scripts = subprocess.run(
        ["rpm", "-qp", "--scripts", str(rpm)], capture_output=True, text=True, check=True
    )
    assert "uninstall-shim" in scripts.stdout  # removing the package takes the shim away too


def test_sha256sums_cover_every_artifact(built: Path):
    listed = dict(reversed(line.split("  ")) for line in (built / "SHA256SUMS").read_text().splitlines())
    artifacts = {p.name for p in built.iterdir() if p.name != "SHA256SUMS"}
    assert set(listed) == artifacts and {Path(n).suffix for n in artifacts} == {".gz", ".rpm", ".whl"}
    for name, digest in listed.items():
        assert hashlib.sha256((built / name).read_bytes()).hexdigest() == digest


JOBS = ("backup", "prune", "verify")  # the scheduled jobs install-dom0.sh makes units for


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_installer_and_uninstall_leave_dom0_as_it_was(tmp_path: Path):
    dom0 = tmp_path / "dom0"
    (dom0 / "usr/local/bin").mkdir(parents=True)
    (dom0 / "usr/local/bin/someone-elses").write_text("#!/bin/sh\n")
    before = tree(dom0)
    script = TOP / "packaging/dom0/install-dom0.sh"
    args = ["--destdir", str(dom0), "--prefix", "/usr/local", "--unitdir", "/etc/systemd/system"]
    subprocess.run(["sh", str(script), *args], check=True, capture_output=True)
    for job in JOBS:
        unit = (dom0 / f"etc/systemd/system/qtb-pipe-{job}@.service").read_text()
        documentation = re.search(r"^Documentation=file://(\S+)$", unit, re.M)[1]
        assert (dom0 / documentation.lstrip("/")).is_file()  # the unit's Documentation= exists
        exec_start = re.search(rf"^\s+(/\S+/qtb-pipe) {job}$", unit, re.M)[1]
        assert (dom0 / exec_start.lstrip("/")).is_file()
        # every job on AC power only, at low priority, one at a time, with a notice if it fails
        for line in ("ConditionACPower=true", "Nice=19", "IOSchedulingClass=idle"):
            assert f"\n{line}\n" in unit
        assert "ExecStart=/usr/bin/flock /var/lib/qtb-pipe/jobs.lock " in unit and "--mode=block" in unit
        assert f"notify-failure %i {job}\n" in unit
        timer = (dom0 / f"etc/systemd/system/qtb-pipe-{job}@.timer").read_text()
        assert "Persistent=true" in timer and not re.search("@[A-Z]+@", unit + timer)  # all filled in
        calendar = re.search(r"^OnCalendar=(.+)$", timer, re.M)[1]
        assert subprocess.run(["systemd-analyze", "calendar", calendar], capture_output=True).returncode == 0
    wrapper = (dom0 / "usr/local/bin/qtb-pipe").read_text()
    assert 'sys.path.insert(0, "/usr/local/lib/qtb-pipe")' in wrapper  # where it will be, not the destdir
    # the installed copy runs on its own: no source tree, no venv, only the system's python3 -I
    lib = str(dom0 / "usr/local/lib/qtb-pipe")
    code = f"import sys; sys.path.insert(0, {lib!r}); from qtb_pipe.cli import main; main(['--version'])"
    version = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert version.stdout.startswith("qtb-pipe "), version.stderr
    subprocess.run(["sh", str(script), "--uninstall", *args], check=True, capture_output=True)
    assert tree(dom0) == before


def test_the_scheduled_jobs_units_pass_systemd_analyze_verify(tmp_path: Path):
    # installed for real paths (destdir /, a prefix under tmp_path), so that systemd finds every
    # program the units name; systemd-analyze reports a bad setting on stderr but exits 0 for it
    prefix, units, instances = tmp_path / "usr", tmp_path / "units", tmp_path / "check"
    script = TOP / "packaging/dom0/install-dom0.sh"
    args = ["--destdir", "/", "--prefix", str(prefix), "--unitdir", str(units)]
    subprocess.run(["sh", str(script), *args], check=True, capture_output=True)
    instances.mkdir()
    for job in JOBS:
        for kind in ("service", "timer"):
            (instances / f"qtb-pipe-{job}@root.{kind}").write_text(
                (units / f"qtb-pipe-{job}@.{kind}").read_text()
            )
    checked = subprocess.run(
        ["systemd-analyze", "verify", *sorted(map(str, instances.iterdir()))], capture_output=True, text=True
    )
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr


def test_the_failure_notice_goes_through_the_users_session_bus_not_a_display(tmp_path: Path):
    """12.6: notify-failure reaches the dom0 user's session by its bus (/run/user/UID/bus), whatever
    the display is called; nothing on success or without a session. The system's `id`, `runuser` and
    `notify-send` are stubs on PATH that record how they were called."""
    uid = 4000000 + (tmp_path.stat().st_ino % 99999)  # a uid no session has
    stubs, log = tmp_path / "bin", tmp_path / "calls"
    stubs.mkdir()
    for name, body in (("id", f"echo {uid}"), ("runuser", f'printf "%s\\n" "$@" > {log}; env >> {log}')):
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    script = TOP / "packaging/dom0/notify-failure"
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "SERVICE_RESULT": "exit-code", "EXIT_STATUS": "5"}

    def notify(**extra: str) -> subprocess.CompletedProcess:
        log.unlink(missing_ok=True)
        return subprocess.run(
            ["sh", str(script), "alice", "verify"], env={**env, **extra}, capture_output=True
        )

    assert notify().returncode == 0 and not log.exists()  # no session bus: the journal has it
    if os.geteuid() != 0:  # the script looks where logind puts the bus, which only root may add to
        pytest.skip("needs root (as CI runs) to make a session bus under /run/user")
    runtime = Path("/run/user")
    made_runtime = not runtime.exists()
    bus_dir = runtime / str(uid)
    bus_dir.mkdir(parents=True)
    try:
        with socket.socket(socket.AF_UNIX) as bus:
            bus.bind(str(bus_dir / "bus"))
            assert notify(SERVICE_RESULT="success").returncode == 0 and not log.exists()
            assert notify(DISPLAY=":7").returncode == 0
    finally:
        (bus_dir / "bus").unlink(missing_ok=True)
        bus_dir.rmdir()
        if made_runtime:  # leave the host as it was
            runtime.rmdir()
    argv = log.read_text().splitlines()
    assert (
        argv[:4] == ["-u", "alice", "--", "env"]
        and f"DBUS_SESSION_BUS_ADDRESS=unix:path={bus_dir}/bus" in argv
    )
    assert (
        "notify-send" in argv
        and "qtb-pipe verify failed" in argv
        and "Result: exit-code (5)." in log.read_text()
    )
    assert not any(a.startswith("DISPLAY=") for a in argv[: argv.index("notify-send")])  # none set by it
