"""dom0's Qubes tools, as qtb-pipe calls them: qvm-ls, qvm-start, qvm-run, and the stock
qvm-backup / qvm-backup-restore (their options mapped from typed option objects, here only)."""

from __future__ import annotations

import contextlib
import getpass
import grp
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from scrypt_shim import shim

from . import proc
from .errors import EXIT_QUBE, EXIT_VERIFY, QtbError

# qubesadmin/tools/qvm_backup.py print_progress: `\rMaking a backup... 12.34%` on stderr
PROGRESS_RE = re.compile(rb"Making a backup\.\.\. ([0-9]{1,3}(?:\.[0-9]{1,2})?)%")


@dataclass
class QubeInfo:
    klass: str
    qid: int
    running: bool
    include_in_backups: bool


# qvm-backup-restore fetches qubes.xml from a qube under a fixed 1 MiB cap that --ignore-size-limit
# does not lift (facts §3; what the user then sees: docs/qubes-facts.md R8)
QUBES_XML_RETRIEVAL_CAP = 1024 * 1024


def qubes_xml_too_big(chunks: list[dict]) -> str | None:
    """Why a stream of these chunks (a manifest's) cannot be restored from the backup qube, if so."""
    sent = sum(c["size"] + shim.TRAILER_SIZE for c in chunks if c["path"] == shim.QUBES_XML_PATH)
    if sent <= QUBES_XML_RETRIEVAL_CAP:
        return None
    return (
        f"its qubes.xml ({sent} bytes) is over the 1 MiB that qvm-backup-restore accepts from a qube: "
        "restore it from a local copy of the stream (docs/emergency-restore.md)"
    )


def list_qubes() -> dict[str, QubeInfo]:
    res = proc.run(["qvm-ls", "--raw-data", "--fields", "name,class,qid,state,include_in_backups"])
    if res.code != 0:
        raise QtbError(f"qvm-ls failed: {proc.one_line(res.stderr)}")
    qubes = {}
    for line in res.stdout.decode().splitlines():
        name, klass, qid, state, include = line.split("|")
        qubes[name] = QubeInfo(klass, int(qid), state == "Running", include.lower() == "true")
    return qubes


def info_table(text: str) -> dict[str, str]:
    """`qvm-volume info` / `qvm-pool info` rows: a key, spaces, a value."""
    rows = (
        re.split(r"\s+", line.strip(), maxsplit=1) for line in text.splitlines() if line and line[0] != " "
    )
    return {row[0]: row[1] if len(row) > 1 else "" for row in rows}


def pool_info(pool: str) -> dict[str, str]:
    """`qvm-pool info POOL`: its driver and settings, and qubesd's size and usage (facts V2); {} if
    it fails."""
    res = proc.run(["qvm-pool", "info", pool])
    return info_table(res.stdout.decode()) if res.code == 0 else {}


def default_pool(volume: str) -> str:
    """Where a restore makes new `volume` volumes: it gives no pool, so qubesd takes qubes-prefs
    default_pool_VOLUME (facts V8); "" when that is unset or cannot be read."""
    res = proc.run(["qubes-prefs", f"default_pool_{volume}"])
    return res.stdout.decode().strip() if res.code == 0 else ""


def start_qube(name: str) -> None:
    res = proc.run(["qvm-start", name])
    if res.code != 0:
        raise QtbError(f"cannot start {name}: {proc.one_line(res.stderr)}", EXIT_QUBE)


def run_in_qube(
    qube: str, argv: list[str], input: bytes | None = None, stdout_limit: int = 1 << 20
) -> proc.Result:
    """Run a command in a qube (qubes.VMShell through qvm-run), never starting it implicitly."""
    command = " ".join(shlex.quote(a) for a in argv)
    return proc.run(["qvm-run", "--pass-io", "--no-autostart", qube, command], input, stdout_limit)


def qvm_backup(
    backup_qube: str,
    location: str,
    passphrase_file: str,
    qubes: list[str],
    on_progress: Callable[[float], None],
    stall_seconds: int = 0,
) -> proc.Result:
    """Stock qvm-backup, uncompressed, with an explicit qube list (so what we show is what runs)."""
    tail = b""

    def progress(chunk: bytes) -> None:
        nonlocal tail
        tail = (tail + chunk)[-256:]
        if found := PROGRESS_RE.findall(tail):
            on_progress(float(found[-1]))

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
    return proc.run(argv, on_stderr=progress, stall_seconds=stall_seconds)


def dom0_user() -> str:
    """Whose home qvm-backup-restore compares the backup's with (restore.py ~l.1789-1793, v4.4.0): the
    qubes group's first member; with no such group (qubes-sim's host), the user running this."""
    with contextlib.suppress(KeyError, IndexError):
        return grp.getgrnam("qubes").gr_mem[0]
    return getpass.getuser()


@dataclass(frozen=True)
class RestoreFlags:
    """qvm-backup-restore's own options that `qtb-pipe restore` passes through (facts §4)."""

    rename_conflicting: bool = False
    skip_conflicting: bool = False
    skip_broken: bool = False
    ignore_missing: bool = False
    skip_dom0_home: bool = False
    ignore_username_mismatch: bool = False
    paranoid_mode: bool = False
    verify_only: bool = False

    def argv(self) -> list[str]:
        return [f"--{f.name.replace('_', '-')}" for f in fields(self) if getattr(self, f.name)]


# qvm-backup-restore's temporary directory, a mkdtemp per run: ~/QubesIncoming/backup#restore-* in
# R4.2.0, .backup#restore-* from v4.2.18 and R4.3.0, backup#restore/tmp* from v4.3.27 (qubesadmin/
# backup/restore.py __init__): its unpacker writes there what the backup qube sends, unchecked.
RESTORE_TEMPS = (
    "QubesIncoming/backup#restore-*",
    "QubesIncoming/.backup#restore-*",
    "QubesIncoming/backup#restore/*",
)


def _temp_dirs() -> set[Path]:
    return {p for pattern in RESTORE_TEMPS for p in Path.home().glob(pattern)}


def disk_used(dirs: set[Path]) -> tuple[int, int]:
    """Disk these hold, each entry at least a 4 KiB block (an empty file still costs an inode), and
    their entries; walked without recursion (a deep tree must not stop the count)."""
    total, entries, todo = 0, 0, list(dirs)
    while todo:
        with contextlib.suppress(OSError), os.scandir(todo.pop()) as listing:
            for entry in listing:  # what vanishes meanwhile is skipped
                with contextlib.suppress(OSError):
                    total += max(entry.stat(follow_symlinks=False).st_blocks * 512, 4096)
                    entries += 1
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(Path(entry.path))
    return total, entries


def qvm_backup_restore(
    backup_qube: str,
    location: str,
    passphrase_file: str,
    flags: RestoreFlags,
    qubes: list[str],
    bounds: tuple[int, int, int],
    stall_seconds: int,
    alive: Callable[[], object],
) -> proc.Result:
    """Stock qvm-backup-restore from the backup qube. --ignore-size-limit: its byte limit comes from
    qubes.xml's backup-size, which an uncompressed stream exceeds (facts §3); dom0's `bounds` instead:
    bytes of any file it writes (RLIMIT_FSIZE), bytes and entries of its temporary directory (past:
    killed, its leftovers removed); `alive`: the shim's accepted count (see proc.run)."""
    argv = ["qvm-backup-restore", "--ignore-size-limit", "-p", passphrase_file, "-d", backup_qube]
    argv += [*flags.argv(), location, *qubes]
    before, ours, (file_bytes, temp_bytes, temp_entries) = _temp_dirs(), set(), bounds

    def guard(pid: int) -> QtbError | None:
        new = _temp_dirs() - before
        if new and not ours:  # ours: the one its unpacker (or scrypt) was given; another restore's is not
            args = proc.tree_args(pid)
            ours.update(d for d in new if str(d) in args or any(a.startswith(f"{d}/") for a in args))
        used, entries = disk_used(ours or new)
        if used > temp_bytes or entries > temp_entries:
            held = f"{used} bytes in {entries} files, {temp_bytes} in {temp_entries} allowed"
            why = f"refused: the backup qube sent more than the snapshot holds ({held})"
            return QtbError(f"{why}; nothing unverified was restored", EXIT_VERIFY)
        return None

    try:
        return proc.run(argv, file_bytes=file_bytes, stall_seconds=stall_seconds, alive=alive, guard=guard)
    except QtbError:
        if left := ours or _temp_dirs() - before:  # a killed run leaves its directory; rm: no recursion limit
            proc.run(["rm", "-rf", "--one-file-system", "--", *map(str, left)])
        raise
