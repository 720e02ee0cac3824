"""A qtb-pipe run in dom0: its token, its run directory, the passphrase given to the stock tools,
and what the shim leaves there (the shim's side: scrypt_shim.shim.RunDir; docs/design.md)."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from scrypt_shim import shim

from .config import state_dir, write_private
from .errors import EXIT_FAILED, QtbError
from .manifest import Manifest

LOCK_NAME = "lock"
# Held shared by create() from mkdir to rename and exclusively by cleanup_stale_runs() while it scans:
# a `.new-*` directory that cleanup sees was left by a process that died in create().
CREATE_LOCK_NAME = "runs.lock"  # beside runs/


def make_user_passphrase(token: str, secret: bytes) -> str:
    """The passphrase qvm-backup / qvm-backup-restore get for one run: `qtb1:<token>:<secret>`."""
    return f"{shim.USER_PART_MARK}{token}:{secret.hex()}"  # a malformed one: the shim refuses it


@dataclass
class ShimRecord:
    op: str
    path: str
    status: str
    size: int = 0
    tag: str = ""
    backup_id: str | None = None
    error: str = ""


def plan_line(*words: str | int) -> bytes:
    """One fixed-width line of a restore plan (the shim reads line k at k * PLAN_LINE)."""
    text = " ".join(str(w) for w in words)
    if len(text) >= shim.PLAN_LINE or "\n" in text:
        raise ValueError(f"plan entry too long: {text[:80]}")
    return text.ljust(shim.PLAN_LINE - 1).encode() + b"\n"


@dataclass
class Run:
    """A run directory, held under an exclusive lock for as long as its qtb-pipe process lives:
    a directory whose lock can be taken belongs to a dead run and is removed (cleanup_stale_runs)."""

    token: str = field(default_factory=lambda: secrets.token_hex(16))
    run_id: str = field(default_factory=lambda: secrets.token_hex(8))
    lock_fd: int = -1

    @property
    def dir(self) -> Path:
        return state_dir() / "runs" / self.token

    def create(self, secret: str) -> Path:
        """The run directory (locked, then renamed into place, so a cleanup never sees it unlocked)
        and its passphrase file; returns the passphrase file."""
        runs = self.dir.parent
        runs.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = runs / f".new-{self.token}"
        with creating(runs, fcntl.LOCK_SH):
            staging.mkdir(mode=0o700)
            self.lock_fd = os.open(staging / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
            os.rename(staging, self.dir)
        passphrase = self.dir / "passphrase"
        write_private(passphrase, (make_user_passphrase(self.token, bytes.fromhex(secret)) + "\n").encode())
        return passphrase

    def write_plan(self, manifest: Manifest, prefixes: list[str]) -> list[dict]:
        """What this restore pass must decrypt, in stream order: the header, qubes.xml and every chunk
        under `prefixes`. The shim accepts exactly this sequence; returns it."""
        wanted = [c for c in manifest.chunks if c["path"] in (shim.HEADER_PATH, shim.QUBES_XML_PATH)]
        wanted += manifest.chunks_of(prefixes)
        lines = [plan_line("qtb-plan", manifest.backup_id)]
        lines += [plan_line(c["path"], c["size"], c["tag"]) for c in wanted]
        write_private(self.dir / "plan", b"".join(lines))
        return wanted

    def accepted(self) -> int:
        """How many chunks of the plan the shim accepted (one byte each)."""
        try:
            return (self.dir / "accepted").stat().st_size
        except FileNotFoundError:
            return 0

    def records(self, live: bool = False) -> list[ShimRecord]:
        """The shim's record of each chunk; `live`: of a run still going, whose last line may be
        half-written (left out)."""
        try:
            data = (self.dir / "records.jsonl").read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")[:-1] if live else data.splitlines()
        out = []
        for line in lines:
            try:
                data = json.loads(line)
                out.append(
                    ShimRecord(**{k: v for k, v in data.items() if k in ShimRecord.__dataclass_fields__})
                )
            except (ValueError, TypeError):
                raise QtbError(f"damaged shim record in {self.dir}", EXIT_FAILED) from None
        return out

    def streamed(self) -> int:
        """Bytes of the chunks the shim has passed so far in a backup (its progress)."""
        return sum(r.size for r in self.records(live=True) if r.op == "enc")

    def failure(self) -> str | None:
        failed = [r for r in self.records() if r.status != "ok"]
        return f"{failed[0].path}: {failed[0].error[:300]}" if failed else None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


@contextmanager
def creating(runs: Path, mode: int) -> Iterator[None]:
    fd = os.open(runs.parent / CREATE_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


def cleanup_stale_runs() -> None:
    """Remove the run directories of runs that died (killed, power loss): their passphrase files
    hold the secret. Every command calls this first; live runs keep their lock and are left alone."""
    runs = state_dir() / "runs"
    try:
        with creating(runs, fcntl.LOCK_EX):
            for d in runs.iterdir():
                remove_if_dead(d)
    except OSError:
        return


def remove_if_dead(d: Path) -> None:
    if d.name.startswith(".new-"):  # its process died in create(): a live one holds the create lock
        shutil.rmtree(d, ignore_errors=True)
        return
    try:
        fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        shutil.rmtree(d, ignore_errors=True)  # no lock file: not a live run's directory
        return
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # a live run
    finally:
        os.close(fd)
    shutil.rmtree(d, ignore_errors=True)
