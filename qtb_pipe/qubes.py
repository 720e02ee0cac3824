"""The one place that runs programs: the stock Qubes tools and the adapter in the backup qube.

Everything the backup qube sends is hostile: output is size-bounded, error text is reduced to
one line of printable ASCII before it reaches the user's terminal, JSON is parsed by the callers
against a schema (see `adapter.py`).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .errors import EXIT_FAILED, EXIT_QUBE, QtbError

MAX_ERROR_BYTES = 64 * 1024
PROGRESS_RE = re.compile(rb"Backup progress: ([0-9]+(?:\.[0-9]+)?)%")


def printable(text: str, limit: int = 2000) -> str:
    """Text that may carry bytes from the backup qube, made safe for a terminal."""
    return re.sub(r"[^\x20-\x7e\n]", "?", text)[:limit]


def one_line(raw: bytes, fallback: str = "") -> str:
    """The last meaningful line of untrusted error output, printable ASCII only, bounded."""
    text = raw.decode("ascii", errors="replace")
    lines = [re.sub(r"[^\x20-\x7e]", "?", ln).strip() for ln in re.split(r"[\r\n]+", text)]
    lines = [ln for ln in lines if ln and not ln.startswith("Backup progress")]
    return (lines[-1] if lines else fallback)[:300]


@dataclass
class Result:
    code: int
    stdout: bytes
    stderr: bytes


def run(argv: list[str], input: bytes | None = None, stdout_limit: int = 1 << 20) -> Result:
    """Run a command, reading at most stdout_limit bytes of its output (more is an error).
    Its stderr is drained to the end (so it can never block the child) and kept up to a cap."""
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError:
        raise QtbError(f"{argv[0]} not found: is this dom0 (or a qubes-sim world)?", EXIT_FAILED) from None
    err = bytearray()
    err_reader = threading.Thread(target=_drain, args=(proc.stderr, err), daemon=True)
    err_reader.start()
    if input is not None:
        threading.Thread(target=_feed, args=(proc.stdin, input), daemon=True).start()
    out = proc.stdout.read(stdout_limit + 1)
    if len(out) > stdout_limit:
        proc.kill()
        proc.wait()
        raise QtbError(f"{argv[0]}: output larger than {stdout_limit} bytes, refused", EXIT_FAILED)
    code = proc.wait()
    err_reader.join()
    return Result(code, out, bytes(err))


def _drain(stream, keep: bytearray) -> None:
    while chunk := stream.read(65536):
        if len(keep) < MAX_ERROR_BYTES:
            keep.extend(chunk[: MAX_ERROR_BYTES - len(keep)])


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except BrokenPipeError:
        pass


# --- qubes --------------------------------------------------------------------------------
@dataclass
class QubeInfo:
    name: str
    klass: str
    qid: int
    running: bool
    include_in_backups: bool


def list_qubes() -> dict[str, QubeInfo]:
    res = run(["qvm-ls", "--raw-data", "--fields", "name,class,qid,state,include_in_backups"])
    if res.code != 0:
        raise QtbError(f"qvm-ls failed: {one_line(res.stderr)}")
    qubes = {}
    for line in res.stdout.decode().splitlines():
        name, klass, qid, state, include = line.split("|")
        qubes[name] = QubeInfo(name, klass, int(qid), state == "Running", include.lower() == "true")
    return qubes


def start_qube(name: str) -> None:
    res = run(["qvm-start", name])
    if res.code != 0:
        raise QtbError(f"cannot start {name}: {one_line(res.stderr)}", EXIT_QUBE)


def run_in_qube(
    qube: str, argv: list[str], input: bytes | None = None, stdout_limit: int = 1 << 20
) -> Result:
    """Run a command in a qube (qubes.VMShell through qvm-run), never starting it implicitly."""
    command = " ".join(shlex.quote(a) for a in argv)
    return run(["qvm-run", "--pass-io", "--no-autostart", qube, command], input, stdout_limit)


# --- the stock backup tools ---------------------------------------------------------------
def qvm_backup(
    backup_qube: str,
    location: str,
    passphrase_file: str,
    qubes: list[str],
    on_progress: Callable[[float], None],
) -> Result:
    """Stock qvm-backup, uncompressed, with an explicit qube list (so what we show is what runs)."""
    argv = [
        "qvm-backup",
        "--yes",
        "--no-compress",
        "-p",
        passphrase_file,
        "-d",
        backup_qube,
        location,
        *qubes,
    ]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = bytearray()
    out_reader = threading.Thread(target=_drain, args=(proc.stdout, out), daemon=True)
    out_reader.start()
    err = bytearray()
    buf = b""
    while chunk := os.read(proc.stderr.fileno(), 4096):
        err += chunk
        del err[:-MAX_ERROR_BYTES]
        buf = (buf + chunk)[-256:]
        found = PROGRESS_RE.findall(buf)
        if found:
            on_progress(float(found[-1]))
    code = proc.wait()
    out_reader.join()
    return Result(code, bytes(out), bytes(err))


def qvm_backup_restore(
    backup_qube: str, location: str, passphrase_file: str, options: list[str], qubes: list[str]
) -> Result:
    argv = [
        "qvm-backup-restore",
        "--ignore-size-limit",
        "-p",
        passphrase_file,
        "-d",
        backup_qube,
        *options,
        location,
        *qubes,
    ]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = bytearray(), bytearray()
    readers = [
        threading.Thread(target=_drain, args=(s, b), daemon=True)
        for s, b in ((proc.stdout, out), (proc.stderr, err))
    ]
    for r in readers:
        r.start()
    code = proc.wait()
    for r in readers:
        r.join()
    return Result(code, bytes(out), bytes(err))
