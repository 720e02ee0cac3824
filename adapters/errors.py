"""Errors of qtb-adapter, each bound to the exit code documented in docs/adapters.md (Exit codes)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    OTHER = 1
    USAGE = 2
    NO_REPOSITORY = 3
    UNKNOWN_SNAPSHOT = 4
    WRONG_PASSWORD = 5
    LOCKED = 6
    BAD_INPUT = 7
    ENGINE_UNUSABLE = 8
    NO_SPACE = 9


class AdapterError(Exception):
    """An error that ends a subcommand: one line on stderr and a documented exit code."""

    exit_code: ExitCode = ExitCode.OTHER

    def __init__(self, message: str) -> None:
        # Engines print multi-line messages; the contract is one line on stderr.
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(AdapterError):
    exit_code = ExitCode.USAGE


class RepositoryMissingError(AdapterError):
    """No config, no repository at the configured place, or a repository that is not initialised."""

    exit_code = ExitCode.NO_REPOSITORY


class SnapshotNotFoundError(AdapterError):
    """Unknown snapshot or run, or a snapshot that is still pending where a complete one is needed."""

    exit_code = ExitCode.UNKNOWN_SNAPSHOT


class WrongPasswordError(AdapterError):
    exit_code = ExitCode.WRONG_PASSWORD


class RepositoryLockedError(AdapterError):
    exit_code = ExitCode.LOCKED


class BadInputError(AdapterError):
    """The stream on stdin (store) or the manifest on stdin (commit) is not acceptable."""

    exit_code = ExitCode.BAD_INPUT


class EngineUnusableError(AdapterError):
    """The engine binary is missing, too old or too new."""

    exit_code = ExitCode.ENGINE_UNUSABLE


class NoSpaceError(AdapterError):
    exit_code = ExitCode.NO_SPACE


class EngineError(AdapterError):
    """The engine failed for a reason none of the specific codes describes."""

    exit_code = ExitCode.OTHER
