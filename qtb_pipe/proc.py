"""The one place dom0 runs programs. Every command line goes through `run` (or `hook`; each is
logged with -v); output that comes from another qube is bounded, and error text is reduced to
printable ASCII before it reaches the user's terminal."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import EXIT_FAILED, QtbError

MAX_ERROR_BYTES = 64 * 1024
VERBOSE = False  # set by the command line (-v)


def printable(text: str, limit: int = 2000) -> str:
    """Text that may carry bytes from the backup qube, made safe for a terminal."""
    return re.sub(r"[^\x20-\x7e\n]", "?", text)[:limit]


def one_line(raw: bytes, fallback: str = "") -> str:
    """The last meaningful line of untrusted error output (progress lines skipped), bounded."""
    lines = [printable(ln).strip() for ln in re.split(r"[\r\n]+", raw.decode("ascii", "replace"))]
    lines = [ln for ln in lines if ln and not ln.startswith("Making a backup...")]
    return (lines[-1] if lines else fallback)[:300]


@dataclass
class Result:
    code: int
    stdout: bytes
    stderr: bytes


def _spawn(
    argv: list[str], stdin: int, preexec: Callable[[], None] | None = None, **popen
) -> subprocess.Popen:
    """Every child dom0 starts: logged with -v; stdout and stderr are pipes unless `popen` says."""
    if VERBOSE:
        print(f"qtb-pipe: + {shlex.join(argv)}", file=sys.stderr, flush=True)
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    try:
        return subprocess.Popen(argv, stdin=stdin, preexec_fn=preexec, **popen)
    except FileNotFoundError:
        raise QtbError(f"{argv[0]} not found: is this dom0 (or a qubes-sim world)?", EXIT_FAILED) from None


def _drain(stream, keep: bytearray, on_chunk: Callable[[bytes], None] | None = None) -> None:
    while chunk := os.read(stream.fileno(), 65536):
        if on_chunk is not None:
            on_chunk(chunk)
        keep.extend(chunk)
        del keep[:-MAX_ERROR_BYTES]  # the end is what explains a failure


def _limits(file_bytes: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec: no file it writes may grow larger, no core dumps
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, resource.RLIM_INFINITY))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def hook(command: str, env: dict[str, str], timeout: int) -> str | None:
    """A hook of the user's config: `sh -c COMMAND` in a session of its own, its output on our stderr
    (stdout is the result's), its stderr also kept for the reason; waited for, not its pipes, so a
    child it leaves running does not hold the job. A timeout or Ctrl-C kills the whole session."""
    with tempfile.TemporaryFile() as err:
        sys.stderr.flush()
        child = _spawn(["/bin/sh", "-c", command], subprocess.DEVNULL, None, stdout=2, stderr=err,
                       start_new_session=True, env={**os.environ, **env})  # fmt: skip
        try:
            code = child.wait(timeout)
        except BaseException as e:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            return f"still running after {timeout} s (hooks.timeout): stopped"
        err.seek(0)
        said = err.read()[-MAX_ERROR_BYTES:]
    sys.stderr.write(printable(said.decode(errors="replace"), 20_000))
    return f"exited with code {code}: {one_line(said, 'no message')}" if code else None


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except BrokenPipeError:
        pass


# How often a guard is asked: what dom0 takes in during that time is the slack of its bound.
GUARD_SECONDS = 0.02
STALL_GRACE_SECONDS = 60  # after SIGINT, for qvm-backup to cancel in qubesd


def _parent(pid: str) -> int | None:
    with contextlib.suppress(OSError, IndexError, ValueError):  # "PID (COMM) STATE PPID …"
        return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
    return None


def tree(pid: int, visit: Callable[[int], object] = lambda pid: None) -> set[int]:
    """A process and all under it (through /proc's parent links), `visit` called on each as found:
    kill_tree stops them there, so none forks or is re-parented unseen."""
    seen, found = set(), {pid}
    while found:
        for child in found:
            with contextlib.suppress(OSError):  # gone, or not ours to stop (a sudo): killed below
                visit(child)
        seen |= found
        found = {int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(p) in seen} - seen
    return seen


def tree_args(pid: int) -> set[str]:
    """The command-line arguments of a process and all under it."""
    args: set[str] = set()
    for child in tree(pid):
        with contextlib.suppress(OSError):
            args.update(os.fsdecode(a) for a in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"))
    return args


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all under it, each stopped first."""
    for child in tree(pid, lambda p: os.kill(p, signal.SIGSTOP)):
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)


def run(
    argv: list[str],
    input: bytes | None = None,
    stdout_limit: int = 1 << 20,
    on_stderr: Callable[[bytes], None] | None = None,
    file_bytes: int | None = None,
    stall_seconds: int = 0,
    alive: Callable[[], object] | None = None,
    guard: Callable[[int], QtbError | None] | None = None,
) -> Result:
    """Run a command: at most `stdout_limit` bytes of stdout (more: killed and refused), the end of
    stderr kept, each stderr chunk handed to `on_stderr` (progress). For the stock tools: `file_bytes`
    caps every file they and their children write (RLIMIT_FSIZE: restore's temporary files stay
    within the manifest); one silent on stderr for `stall_seconds`, with `alive()` (a progress
    marker) unchanged, gets SIGINT as from Ctrl-C (qvm-backup then cancels in qubesd, e.g. when
    qubesd waits forever on a qube), a minute later it and all it started SIGKILL. `guard(pid)`,
    asked every GUARD_SECONDS (also in that minute), returning an error: the command and all it
    started are killed at once and that error raised."""
    stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
    proc = _spawn(argv, stdin, _limits(file_bytes) if file_bytes else None)
    if input is not None:
        threading.Thread(target=_feed, args=(proc.stdin, input), daemon=True).start()
    out, err = bytearray(), bytearray()

    def read_stdout() -> None:
        out.extend(proc.stdout.read(stdout_limit + 1))
        if len(out) > stdout_limit:
            proc.kill()  # what it started may hold the pipes open: not waited for (below)

    heard, stalled, breach = [time.monotonic(), alive and alive()], threading.Event(), []

    def on_chunk(chunk: bytes) -> None:
        heard[0] = time.monotonic()
        if on_stderr:
            on_stderr(chunk)

    def watch() -> None:  # alive() at each tick: it may draw progress too (ui throttles that)
        deadline = None  # after a stall's SIGINT: when the rest is killed
        while not ended.wait(GUARD_SECONDS if guard else 1):
            if proc.returncode is not None:  # reaped: its pid may be another process's by now
                return
            if guard and (error := guard(proc.pid)):
                breach.append(error)
                return kill_tree(proc.pid)
            if deadline:
                if time.monotonic() > deadline:
                    return kill_tree(proc.pid)
                continue
            if alive and (mark := alive()) != heard[1]:
                heard[:] = [time.monotonic(), mark]
            if stall_seconds and time.monotonic() - heard[0] > stall_seconds:
                stalled.set()
                proc.send_signal(signal.SIGINT)
                deadline = time.monotonic() + STALL_GRACE_SECONDS

    readers = [
        threading.Thread(target=read_stdout, daemon=True),
        threading.Thread(target=_drain, args=(proc.stderr, err, on_chunk), daemon=True),
    ]
    ended, watcher = threading.Event(), threading.Thread(target=watch, daemon=True)
    for thread in readers + ([watcher] if stall_seconds or alive or guard else []):
        thread.start()
    try:
        code = proc.wait()
        for reader in readers if len(out) <= stdout_limit else ():
            reader.join()
    finally:
        ended.set()  # no progress drawn and no stall check once this returns or raises
        if watcher.is_alive():
            watcher.join()
    if breach:
        raise breach[0]
    if len(out) > stdout_limit:
        raise QtbError(f"{argv[0]}: output larger than {stdout_limit} bytes, refused", EXIT_FAILED)
    if stalled.is_set():
        raise QtbError(f"{argv[0]} made no progress for {stall_seconds} s (stall_timeout) and was stopped")
    return Result(code, bytes(out), bytes(err))
