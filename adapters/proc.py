"""The single place where qtb-adapter starts processes (engines, and through them ssh and our filter).

Every child gets its own session, so that killing it kills its helpers too (borg's ssh, restic's
filter), and a parent-death signal, so that a store killed from outside cannot leave an engine
running that would later see end-of-file on its stdin and save a snapshot of a cut stream.
Engine stdout/stderr go to unnamed temporary files, never pipes: no reader threads, no deadlock
while we are busy writing the stream into the engine's stdin.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

# Bounded reads: stderr is only used for one-line error messages, stdout for engine JSON.
STDERR_TAIL_BYTES = 64 * 1024
STDOUT_MAX_BYTES = 256 * 1024 * 1024

_PR_SET_PDEATHSIG = 1
CAPTURE = -100  # stdout= value meaning "collect it for me"


def _die_with_parent() -> None:
    """preexec_fn: the child is killed when qtb-adapter dies, whatever killed qtb-adapter."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: best effort only
        pass


def _debug(argv: Sequence[str]) -> None:
    if os.environ.get("QTB_ADAPTER_DEBUG"):
        print("qtb-adapter: run: " + " ".join(argv), file=sys.stderr)


@dataclass
class Finished:
    """A child that has ended."""

    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def killed_by(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")


def _read_captured(handle: IO[bytes] | None, *, tail: int | None, limit: int | None) -> bytes:
    if handle is None:
        return b""
    size = handle.seek(0, os.SEEK_END)
    start = max(0, size - tail) if tail is not None else 0
    handle.seek(start)
    data = handle.read(limit if limit is not None else -1)
    handle.close()
    return data


class Running:
    """A started child: write into `stdin_fd` when started with stdin=subprocess.PIPE."""

    def __init__(
        self, argv: list[str], popen: subprocess.Popen[bytes], out: IO[bytes] | None, err: IO[bytes]
    ) -> None:
        self.argv = argv
        self._popen = popen
        self._out = out
        self._err = err

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def stdin_fd(self) -> int:
        assert self._popen.stdin is not None
        return self._popen.stdin.fileno()

    def close_stdin(self) -> None:
        """End-of-file for the child. Only ever after the stream was validated completely."""
        if self._popen.stdin is not None and not self._popen.stdin.closed:
            try:
                self._popen.stdin.close()
            except BrokenPipeError:
                pass

    def kill(self) -> None:
        """SIGKILL to the child's whole session (engine plus ssh or filter), before it sees EOF."""
        try:
            os.killpg(self._popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> Finished:
        returncode = self._popen.wait()
        self.close_stdin()
        return Finished(
            argv=self.argv,
            returncode=returncode,
            stdout=_read_captured(self._out, tail=None, limit=STDOUT_MAX_BYTES),
            stderr=_read_captured(self._err, tail=STDERR_TAIL_BYTES, limit=None),
        )


def start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    stdout: int = CAPTURE,
    pass_fds: Sequence[int] = (),
    cwd: str | None = None,
) -> Running:
    """Start a child. stdin: DEVNULL, PIPE or an fd; stdout: CAPTURE or an fd (e.g. 1 for dump)."""
    argv = [str(a) for a in argv]
    _debug(argv)
    # Closed by Running.wait() after reading them back.
    out = tempfile.TemporaryFile() if stdout == CAPTURE else None  # noqa: SIM115
    err = tempfile.TemporaryFile()  # noqa: SIM115
    try:
        popen = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=out if out is not None else stdout,
            stderr=err,
            env=dict(env),
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    except BaseException:
        if out is not None:
            out.close()
        err.close()
        raise
    return Running(argv, popen, out, err)


def run(
    argv: Sequence[str], *, env: Mapping[str, str], stdout: int = CAPTURE, cwd: str | None = None
) -> Finished:
    """Run a child to its end, stdin from /dev/null (no engine here ever asks a question)."""
    return start(argv, env=env, stdout=stdout, cwd=cwd).wait()
