"""Test helpers for the scrypt shim: drive a `scrypt` exactly the way Qubes does, and set up a dom0 root.

qubesd (backup) and qvm-backup-restore (restore) both start scrypt with a fresh pty as its controlling
terminal (setsid + TIOCSCTTY on the slave, echo off), stdin/stdout as pipes or inherited files, stderr as
a pipe. They read exactly the expected prompt bytes from stderr and answer each with `<passphrase>\\n`
on the pty master (facts §1). `run_like_qubes` reproduces that, then feeds stdin data (if the input is
`-`), collects stdout (if there is no output file) and the rest of stderr, and waits for the exit status.
`converse` is the same with an arbitrary script of (expected stderr bytes, answer) pairs.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import select
import subprocess
import termios
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qtb_pipe import runs, shim_install
from scrypt_shim import shim

PROMPT_ENTER = b"Please enter passphrase: "
PROMPT_CONFIRM = b"Please confirm passphrase: "
REAL_SCRYPT = Path("/usr/bin/scrypt")
OPTIONS_WITH_VALUE = frozenset({"-t", "-m", "-M", "--logN", "-r", "-p", "--passphrase"})


@dataclass
class ScryptResult:
    returncode: int
    stdout: bytes  # only filled when there is no output file operand
    stderr: bytes  # everything after the prompts the caller consumed
    prompts_seen: list[bytes]


class UnexpectedPrompt(Exception):
    """The child wrote something other than the expected prompt (Qubes aborts the run here)."""

    def __init__(self, expected: bytes, actual: bytes, result: ScryptResult) -> None:
        super().__init__(f"expected prompt {expected!r}, got {actual!r}; stderr {result.stderr!r}")
        self.expected = expected
        self.actual = actual
        self.result = result


def compute_tag(chunk_key: bytes, path: str, data: bytes) -> bytes:
    """A whole chunk's tag (the shim only ever computes it streaming, with TagHasher)."""
    hasher = shim.TagHasher(chunk_key, path)
    hasher.update(data)
    return hasher.finish()


def scrypt_operands(argv: Sequence[str]) -> list[str]:
    """The infile/outfile operands of a scrypt command line (argv[0] program, argv[1] enc|dec)."""
    operands: list[str] = []
    args = iter(argv[2:])
    for arg in args:
        if arg in OPTIONS_WITH_VALUE:
            next(args, None)
        elif arg == "-" or not arg.startswith("-") or operands:
            operands.append(arg)
    return operands


def prompts_for(argv: Sequence[str]) -> list[bytes]:
    """The prompt sequence Qubes expects for this command line: two for enc, one for dec."""
    return [PROMPT_ENTER, PROMPT_CONFIRM] if argv[1] == "enc" else [PROMPT_ENTER]


def _read_exactly(fd: int, count: int, deadline: float) -> bytes:
    """Read `count` bytes like `p.stderr.read(count)`, stopping early at EOF or the deadline."""
    data = b""
    while len(data) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        piece = os.read(fd, count - len(data))
        if not piece:
            break
        data += piece
    return data


def _read_all(fd: int, sink: list[bytes]) -> None:
    while piece := os.read(fd, 1 << 20):
        sink.append(piece)


def _feed(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 1 << 20]) :]
    except BrokenPipeError:
        pass  # the child refused or died; its exit status tells the test why
    finally:
        os.close(fd)


def converse(
    argv: Sequence[str | os.PathLike[str]],
    script: Sequence[tuple[bytes, bytes]],
    *,
    stdin_data: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120.0,
) -> ScryptResult:
    """Run `argv` on a fresh controlling pty; for each (expected, answer) read exactly `expected` from
    stderr, then write `answer` to the pty master. Raises UnexpectedPrompt on a mismatch."""
    args = [os.fspath(a) for a in argv]
    operands = scrypt_operands(args)
    input_is_stdin = bool(operands) and operands[0] == "-"
    output_is_stdout = len(operands) == 1 or (len(operands) > 1 and operands[1] == "-")

    master, slave = os.openpty()

    def become_session_leader_on_pty() -> None:
        # Exactly Qubes' set_ctty: new session, pty slave as controlling terminal, echo off.
        os.setsid()
        os.close(master)
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, attrs)

    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE if input_is_stdin or stdin_data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE if output_is_stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        preexec_fn=become_session_leader_on_pty,
        pass_fds=(slave,),
    )
    os.close(slave)
    deadline = time.monotonic() + timeout
    stdout_parts: list[bytes] = []
    stderr_parts: list[bytes] = []
    try:
        assert proc.stderr is not None
        err_fd = proc.stderr.fileno()
        seen: list[bytes] = []
        for expected, answer in script:
            actual = _read_exactly(err_fd, len(expected), deadline)
            seen.append(actual)
            if actual != expected:
                if proc.stdin is not None:
                    proc.stdin.close()
                proc.wait(timeout=timeout)
                rest = proc.stderr.read()
                raise UnexpectedPrompt(
                    expected, actual, ScryptResult(proc.returncode, b"", actual + rest, seen)
                )
            os.write(master, answer)
        threads: list[threading.Thread] = []
        if proc.stdin is not None:
            stdin_fd = os.dup(proc.stdin.fileno())
            proc.stdin.close()
            threads.append(threading.Thread(target=_feed, args=(stdin_fd, stdin_data or b"")))
        if proc.stdout is not None:
            threads.append(threading.Thread(target=_read_all, args=(proc.stdout.fileno(), stdout_parts)))
        threads.append(threading.Thread(target=_read_all, args=(err_fd, stderr_parts)))
        for thread in threads:
            thread.daemon = True
            thread.start()
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for thread in threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        return ScryptResult(proc.returncode, b"".join(stdout_parts), b"".join(stderr_parts), seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        # Kept open until the child is gone: closing the master earlier would hang up the child.
        os.close(master)


def run_like_qubes(
    argv: Sequence[str | os.PathLike[str]],
    passphrase: str | bytes,
    *,
    stdin_data: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120.0,
) -> ScryptResult:
    """Qubes' launch_scrypt: two prompts for enc, one for dec, each answered with `<passphrase>\\n`.

    `stdin_data` goes to a stdin pipe after the prompts when the input is "-"; otherwise stdin is
    /dev/null (qubesd's own stdin under systemd).
    """
    args = [os.fspath(a) for a in argv]
    answer = (passphrase.encode() if isinstance(passphrase, str) else passphrase) + b"\n"
    script = [(prompt, answer) for prompt in prompts_for(args)]
    return converse(args, script, stdin_data=stdin_data, env=env, cwd=cwd, timeout=timeout)


def run_without_tty(
    argv: Sequence[str | os.PathLike[str]],
    stdin: bytes,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[bytes]:
    """Run with no controlling terminal (new session, no pty): scrypt then reads passphrases from stdin."""
    return subprocess.run(
        [os.fspath(a) for a in argv],
        input=stdin,
        capture_output=True,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
        timeout=timeout,
        check=False,
    )


def qubes_file_passphrase(backup_id: str | None, path: str, user_passphrase: str) -> str:
    """The per-file passphrase Qubes gives scrypt (facts §1): header vs any other file."""
    if backup_id is None:
        return f"{path}!{user_passphrase}"
    return f"{backup_id}!{path}!{user_passphrase}"


@dataclass
class ShimWorld:
    """A dom0 root with the shim installed and one qtb-pipe run directory, as the driver prepares it."""

    root: Path
    shim: Path
    state_dir: Path
    secret: bytes
    token: str
    work: Path  # scratch directory for inputs and outputs

    @property
    def user_passphrase(self) -> str:
        return runs.make_user_passphrase(self.token, self.secret)

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "runs" / self.token

    def passphrase(self, backup_id: str | None, path: str) -> str:
        return qubes_file_passphrase(backup_id, path, self.user_passphrase)

    def records(self) -> list[dict[str, object]]:
        path = self.run_dir / "records.jsonl"
        return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []

    def accepted(self) -> int:
        path = self.run_dir / "accepted"
        return path.stat().st_size if path.exists() else 0

    def new_run(self) -> None:
        """Start another run (fresh token and run directory), as the driver does per backup/restore."""
        self.token = secrets.token_hex(16)
        self.run_dir.mkdir(mode=0o700, parents=True)

    def write_plan(self, backup_id: str, chunks: list[dict[str, object]]) -> None:
        """A restore pass's plan, written with the driver's own writer (qtb_pipe.runs.plan_line)."""
        lines = [runs.plan_line("qtb-plan", backup_id)]
        lines += [runs.plan_line(c["path"], c["size"], c["tag"]) for c in chunks]
        (self.run_dir / "plan").write_bytes(b"".join(lines))

    def start_restore(self, backup_id: str) -> list[dict[str, object]]:
        """What the driver does after a backup and before a restore: a new run whose plan is this
        run's ok enc records, in order. Returns the enc records."""
        records = [r for r in self.records() if r["op"] == "enc" and r["status"] == "ok"]
        self.new_run()
        self.write_plan(backup_id, records)
        return records

    def enc(self, backup_id: str | None, path: str, data: bytes, out: Path | None = None) -> Path:
        """A data chunk the way qubesd makes it: `scrypt enc - OUT`, data on a stdin pipe."""
        out = out or self.work / (path.replace("/", "_") + ".enc")
        result = run_like_qubes(
            [self.shim, "enc", "-", out], self.passphrase(backup_id, path), stdin_data=data
        )
        assert result.returncode == 0, result
        assert result.stderr == b"", result
        return out

    def dec(self, backup_id: str | None, path: str, encrypted: Path, out: Path) -> ScryptResult:
        """A restore the way qvm-backup-restore does it: `scrypt dec -f IN OUT`."""
        return run_like_qubes([self.shim, "dec", "-f", encrypted, out], self.passphrase(backup_id, path))


def seal_chunk(secret: bytes, path: str, data: bytes) -> bytes:
    """Test oracle: what a qtb-pipe `enc` must write for `data` at `path` (docs/design.md), built
    from the format's parts, not by the shim's own enc."""
    keys = shim.derive_keys(secret)
    return data + shim.make_trailer(keys, len(data), compute_tag(keys.chunk_key, path, data))


def make_world(base: Path, real_scrypt: Path = REAL_SCRYPT) -> ShimWorld:
    """A dom0 root whose usr/bin/scrypt is a symlink to the machine's real scrypt, shim installed."""
    root = base / "dom0"
    for folder in ("usr/bin", "usr/local/bin"):
        (root / folder).mkdir(parents=True)
    (root / "usr/bin/scrypt").symlink_to(real_scrypt)
    installed = shim_install.install_shim(root)
    work = base / "work"
    work.mkdir()
    world = ShimWorld(
        root=root,
        shim=Path(installed["shim"]),
        state_dir=root.resolve() / "var/lib/qtb-pipe",
        secret=secrets.token_bytes(32),
        token="",
        work=work,
    )
    world.new_run()
    return world


def shim_with_fake_real_scrypt(world: ShimWorld) -> tuple[Path, Path]:
    """A copy of the shim whose real scrypt is a script that only logs what it was given: (shim, log).

    The log holds one argument per line, then the content of any `--passphrase file:PATH` it got.
    """
    log = world.work / "real-scrypt.log"
    fake = world.work / "fake-real-scrypt"
    fake.write_text(
        "#!/bin/sh\n"
        f"printf '%s\\n' \"$@\" > '{log}'\n"
        f"for arg; do case $arg in file:*) cat \"${{arg#file:}}\" >> '{log}';; esac; done\n"
    )
    fake.chmod(0o755)
    copy = world.work / "fake-bin" / "scrypt"
    copy.parent.mkdir()
    copy.write_bytes(shim_install.render_shim(fake, world.state_dir))
    copy.chmod(0o755)
    return copy, log
