"""Errors and exit codes of `qtb-pipe` (documented in docs/commands.md)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the operation failed (qvm-backup, qvm-backup-restore, an engine)
EXIT_USAGE = 2  # bad command line or arguments
EXIT_CONFIG = 3  # missing or invalid configuration / secret: run `qtb-pipe init`
EXIT_SNAPSHOT = 4  # unknown or pending snapshot
EXIT_VERIFY = 5  # data failed authentication: tampered, wrong secret, not from this backup
EXIT_QUBE = 6  # backup qube missing / not running / adapter missing or repository not ready
EXIT_SHIM = 7  # the scrypt shim is not installed or not active
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT, as shells report it
# What to do next, per exit code: the `hint` of a JSON error (the line on stderr says what happened)
HINTS = {
    EXIT_FAILED: "see docs/troubleshooting.md",
    EXIT_USAGE: "see qtb-pipe --help",
    EXIT_CONFIG: "run qtb-pipe init, or fix what `qtb-pipe config check` names",
    EXIT_SNAPSHOT: "qtb-pipe list shows the snapshots and each qube's copies",
    EXIT_VERIFY: "the backup qube served data that does not verify: see docs/security.md",
    EXIT_QUBE: "check the backup qube and its adapter: docs/troubleshooting.md",
    EXIT_SHIM: "run qtb-pipe install-shim; qtb-pipe shim-status shows what qubesd runs",
    EXIT_INTERRUPTED: "nothing half-done is listed as complete: run the command again",
}


class QtbError(Exception):
    """A failure reported as one line on stderr and an exit code; never a traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class PartialFailure(QtbError):
    """Part of the work failed (one qube of several): the result is still shown, --json included."""

    def __init__(self, message: str, code: int, result: dict) -> None:
        super().__init__(message, code)
        self.result = result
