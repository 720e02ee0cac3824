"""Harness for the adapter tests: run the real `qtb-adapter` CLI in a private $HOME, and real
network repositories on loopback (restic via `rclone serve restic`, borg over ssh to our own sshd).

Imported by the tests/test_adapter*.py modules (fixtures are re-exported there). Servers are
started and stopped here; a test skips with a clear reason only when a binary is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
ADAPTER = VENV_BIN / "qtb-adapter"
ENGINE_PASSWORD = "correct horse engine staple"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


class AdapterHome:
    """A backup qube's user: its own $HOME (config, state, engine caches) and PATH."""

    def __init__(self, root: Path, extra_path: tuple[Path, ...] = ()) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.password_file = root / "engine-password"
        self.password_file.write_text(ENGINE_PASSWORD + "\n")
        path = ":".join([*map(str, extra_path), str(VENV_BIN), SYSTEM_PATH])
        keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TMPDIR", "TZ")}
        self.env = {**keep, "HOME": str(self.home), "PATH": path}

    @property
    def config_path(self) -> Path:
        return self.home / ".config/qtb-pipe/adapter.toml"

    def run(
        self,
        *args: str,
        stdin: bytes | Path | int | None = None,
        timeout: float = 300,
        env: dict[str, str] | None = None,
    ) -> Result:
        handle = None
        if isinstance(stdin, Path):
            handle = open(stdin, "rb")  # noqa: SIM115 - closed below
            stdin_arg: object = handle
            data = None
        elif isinstance(stdin, bytes):
            stdin_arg, data = subprocess.PIPE, stdin
        elif isinstance(stdin, int):
            stdin_arg, data = stdin, None
        else:
            stdin_arg, data = subprocess.DEVNULL, None
        try:
            done = subprocess.run(
                [str(ADAPTER), *args],
                input=data,
                stdin=None if data is not None else stdin_arg,
                capture_output=True,
                env={**self.env, **(env or {})},
                timeout=timeout,
            )
        finally:
            if handle is not None:
                handle.close()
        return Result(done.returncode, done.stdout, done.stderr.decode(errors="replace"))

    def popen(self, *args: str, stdin: object, stdout: object = subprocess.PIPE) -> subprocess.Popen:
        return subprocess.Popen(
            [str(ADAPTER), *args], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env=self.env
        )

    def ok(self, *args: str, stdin: bytes | Path | int | None = None) -> Result:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, f"qtb-adapter {' '.join(args)} failed: {result.stderr}"
        assert result.stderr == "", result.stderr  # success is silent on stderr
        return result

    def dump_read_partly(self, snapshot_id: str, count: int) -> None:
        """tar2qfile closes its end once it has every member it wants: a quiet, successful end."""
        reader = self.popen("dump", snapshot_id, stdin=subprocess.DEVNULL)
        assert reader.stdout is not None and reader.stderr is not None
        assert len(reader.stdout.read(count)) == count
        reader.stdout.close()
        assert reader.wait(timeout=60) == 0
        assert reader.stderr.read() == b""

    def ok_to_file(self, out: Path, *args: str) -> None:
        """Run with stdout straight into a file (as qubes.Restore's FIFO would take it)."""
        with open(out, "wb") as handle:
            done = subprocess.run([str(ADAPTER), *args], stdout=handle, stderr=subprocess.PIPE, env=self.env)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        assert done.stderr == b""

    def init(self, engine: str, repo: str, *settings: str) -> Result:
        args = [
            "init",
            "--json",
            "--engine",
            engine,
            "--repo",
            repo,
            "--password-file",
            str(self.password_file),
        ]
        for setting in settings:
            args += ["--set", setting]
        return self.ok(*args)

    def edit_config(self, old: str, new: str) -> None:
        text = self.config_path.read_text()
        assert old in text
        self.config_path.write_text(text.replace(old, new, 1))

    def snapshots(self, *, pending: bool = False) -> list[dict]:
        args = ["list", "--json"] + (["--pending"] if pending else [])
        return self.ok(*args).json()["snapshots"]


# -- servers --------------------------------------------------------------------------------------
@dataclass
class RestServer:
    url: str
    root: Path


@pytest.fixture(scope="module")
def rclone_rest_server(tmp_path_factory) -> Iterator[RestServer]:
    rclone = shutil.which("rclone")
    if rclone is None:
        pytest.skip("rclone is not installed (needed for restic's REST repository test)")
    root = tmp_path_factory.mktemp("rclone-rest")
    port = free_port()
    env = {"HOME": str(root), "PATH": SYSTEM_PATH, "RCLONE_CONFIG": str(root / "rclone.conf")}
    process = subprocess.Popen(
        [rclone, "serve", "restic", "--addr", f"127.0.0.1:{port}", str(root / "repos")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(root / "rclone.log", "wb"),  # noqa: SIM115 - lives as long as the server
    )
    try:
        wait_for_port(port, process, "rclone serve restic")
        yield RestServer(f"rest:http://127.0.0.1:{port}", root / "repos")
    finally:
        stop(process)


@dataclass
class SshServer:
    port: int
    user: str
    rsh: str  # BORG_RSH for the client

    def repo(self, path: Path) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory) -> Iterator[SshServer]:
    sshd, ssh_keygen, ssh = "/usr/sbin/sshd", shutil.which("ssh-keygen"), shutil.which("ssh")
    if not os.access(sshd, os.X_OK) or ssh_keygen is None or ssh is None:
        pytest.skip("openssh-server/openssh-client are not installed (needed for borg over ssh)")
    root = tmp_path_factory.mktemp("sshd")
    user = (
        os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    )
    for name in ("host_key", "client_key"):
        subprocess.run([ssh_keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    port = free_port()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {(root / 'host_key.pub').read_text()}")
    (root / "sshd_config").write_text(
        "\n".join([
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {root / 'host_key'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}",
            f"PidFile {root / 'sshd.pid'}",
            "StrictModes no",  # our files live under /tmp, which is world-writable
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "LogLevel ERROR",
            "",
        ])
    )  # fmt: skip
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    process = subprocess.Popen(
        [sshd, "-D", "-e", "-f", str(root / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "sshd.log", "wb"),  # noqa: SIM115 - lives as long as the server
    )
    try:
        wait_for_port(port, process, "sshd")
        rsh = (
            f"ssh -F /dev/null -p {port} -i {root / 'client_key'} -o IdentitiesOnly=yes -o BatchMode=yes "
            f"-o UserKnownHostsFile={root / 'known_hosts'} -o StrictHostKeyChecking=yes"
        )
        yield SshServer(port, user, rsh)
    finally:
        stop(process)


# -- processes -----------------------------------------------------------------------------------
@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; whatever still runs when the test ends (e.g. failed) is killed."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def producer_process(
    data_path: Path, first_bytes: int, then: str, gate: Path | None = None
) -> subprocess.Popen:
    """A qubesd stand-in: writes the first bytes, then dies (`kill`) or waits for `gate` and ends."""
    code = (
        "import os, signal, sys, time\n"
        f"data = open({str(data_path)!r}, 'rb').read()\n"
        f"sys.stdout.buffer.write(data[:{first_bytes}]); sys.stdout.buffer.flush()\n"
        f"if {then!r} == 'kill': os.kill(os.getpid(), signal.SIGKILL)\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.02)\n"
        f"sys.stdout.buffer.write(data[{first_bytes}:])\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)


def children(pid: int) -> list[tuple[int, list[str]]]:
    """(pid, argv) of the children of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.append((int(entry.name), argv))
    return found


def engine_taking_stream(store: subprocess.Popen) -> int:
    """The pid of the engine process that is taking in the stream under `store`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid, argv in children(store.pid):
            if {"backup", "import-tar", "create"} & set(argv):
                time.sleep(0.5)  # let it take in the first half
                return pid
        time.sleep(0.05)
    raise AssertionError("the engine never started")


def directory_bytes(path: Path) -> int:
    """Total size of the files of a local repository (what the repository costs on disk)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
