"""A qtb-pipe run in dom0: its token, its run directory, the passphrase given to the stock tools,
and the shim's records (contract: docs/design.md)."""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from scrypt_shim import shim

from .config import state_dir, write_private
from .errors import EXIT_FAILED, QtbError

TRAILER = shim.TRAILER_SIZE


@dataclass
class ShimRecord:
    op: str
    path: str
    status: str
    size: int = 0
    tag: str = ""
    backup_id: str | None = None
    error: str = ""


@dataclass
class Run:
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    run_id: str = field(default_factory=lambda: secrets.token_hex(8))

    @property
    def dir(self) -> Path:
        return state_dir() / "runs" / self.token

    def create(self, secret: str) -> Path:
        """Make the run directory and the passphrase file; returns the passphrase file."""
        self.dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir.mkdir(mode=0o700)
        passphrase = self.dir / "passphrase"
        write_private(
            passphrase, (shim.make_user_passphrase(self.token, bytes.fromhex(secret)) + "\n").encode()
        )
        return passphrase

    def records(self) -> list[ShimRecord]:
        out = []
        for data in shim.read_records(str(self.dir)):
            try:
                out.append(
                    ShimRecord(**{k: v for k, v in data.items() if k in ShimRecord.__dataclass_fields__})
                )
            except TypeError:
                raise QtbError(f"damaged shim record in {self.dir}", EXIT_FAILED) from None
        return out

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def cleanup_stale_runs(max_age_s: float = 7 * 86400) -> None:
    """Run directories of runs that died without cleaning up (their passphrase file included)."""
    import time

    runs = state_dir() / "runs"
    if not runs.is_dir():
        return
    for d in runs.iterdir():
        try:
            if time.time() - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass
