"""The contract every engine module implements, and the store machinery they share.

An engine module (adapters/<name>.py) defines one subclass of `Engine` and names it `ENGINE`;
`load_engine()` finds it by the config's `engine` name, so adding an engine is adding a module.

Repository model, the same for every engine:
- `store` saves the filtered stream as one *stream object* (restic snapshot, borg archive) marked
  with its run. On its own a stream object is PENDING.
- `commit` saves a second, small *commit object* holding the sealed manifest and a summary, bound
  to the stream object. Saving that object is the engine's own atomic step, so a stream is
  COMPLETE exactly when its commit object exists; there is no state in between.
- Anything else of ours (commit objects whose stream is gone, borg checkpoints) is an orphan that
  `drop-pending` removes and every other command ignores.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from . import proc
from .config import AdapterConfig
from .errors import BadInputError, EngineError, EngineUnusableError, RepositoryMissingError, UsageError
from .tarstream import Member, StreamFilter, StreamRejected, StreamSummary, write_all_to

STREAM_FILENAME = "qubes-backup-v4.tar"  # the stream's name inside the engine
MANIFEST_FILENAME = "qtb-manifest.json"
SNAPSHOT_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,80}")
RUN_ID_RE = re.compile(r"[a-z0-9]{8,40}")


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_engine_time(text: str, *, naive_is_local: bool = False) -> datetime:
    """restic: RFC 3339 with nanoseconds; borg 1.2: naive local time with microseconds."""
    match = re.fullmatch(r"(.*?T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?", text.strip())
    if not match:
        raise EngineError(f"unexpected time format from the engine: {text!r}")
    base, fraction, zone = match.groups()
    fraction = (fraction or ".0")[:7]
    zone = "+00:00" if zone == "Z" else zone
    moment = datetime.fromisoformat(base + fraction + (zone or ""))
    if moment.tzinfo is None:
        moment = moment.astimezone() if naive_is_local else moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class EngineVersion:
    engine: str
    version: tuple[int, int, int]
    text: str

    def __str__(self) -> str:
        return ".".join(map(str, self.version))


@dataclass
class CommitRecord:
    """What the commit object says about its backup, readable from a plain engine listing."""

    object_id: str  # the commit object in the engine (restic snapshot id, borg archive name)
    backup_id: str
    qubes: list[str]
    stream_bytes: int
    added_bytes: int | None
    members: int
    manifest_sha256: str
    manifest_bytes: int
    committed_at: str = ""


@dataclass
class RepoSnapshot:
    """A stream object of ours, pending or complete."""

    id: str
    run: str
    time: datetime
    method: str
    engine_stream_bytes: int | None = None  # what the engine itself says it stored (if it says)
    engine_added_bytes: int | None = None
    commit: CommitRecord | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # engine-private details

    @property
    def complete(self) -> bool:
        return self.commit is not None

    @property
    def state(self) -> str:
        return "complete" if self.complete else "pending"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "time": self.time.isoformat()}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RepoSnapshot:
        commit = raw.get("commit")
        return cls(
            **{k: v for k, v in raw.items() if k not in ("time", "commit")},
            time=datetime.fromisoformat(raw["time"]),
            commit=CommitRecord(**commit) if isinstance(commit, dict) else None,
        )


@dataclass
class Orphan:
    """An engine object of ours that belongs to no stream (or a borg checkpoint)."""

    id: str
    kind: str
    time: datetime | None = None


@dataclass
class RepoListing:
    snapshots: list[RepoSnapshot]
    orphans: list[Orphan] = field(default_factory=list)

    @property
    def complete(self) -> list[RepoSnapshot]:
        return [s for s in self.snapshots if s.complete]

    @property
    def pending(self) -> list[RepoSnapshot]:
        return [s for s in self.snapshots if not s.complete]


@dataclass
class StoreOutcome:
    snapshot_id: str
    method: str
    added_bytes: int | None
    summary: StreamSummary


@dataclass
class CheckOutcome:
    ok: bool
    output: str
    read_data: str  # "none", "all" or the subset actually verified


@dataclass
class FilterRun:
    """An engine run whose input went through our stream filter, as the engine's own child."""

    finished: proc.Finished
    summary: StreamSummary | None
    rejected: str | None  # the filter found the stream bad: its reason
    filter_error: str | None  # the filter failed otherwise (e.g. the engine stopped reading)


def _read_filter_report(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def version_tuple(text: str) -> tuple[int, int, int] | None:
    """The first word that is a version: borg prints its own name first, which may hold digits
    (`borg-1.2 1.4.5` for a borg installed as borg-1.2)."""
    match = re.search(r"(?:^|\s)v?(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        return None
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


class Engine(ABC):
    name: ClassVar[str]
    minimum_version: ClassVar[tuple[int, int, int]]
    below_version: ClassVar[tuple[int, int, int] | None] = None  # first unsupported version

    def __init__(self, config: AdapterConfig) -> None:
        self.config = config
        self.settings: dict[str, Any] = config.engine_settings
        self._version: EngineVersion | None = None

    # -- binary and version -------------------------------------------------------------------
    @property
    def binary(self) -> str:
        return str(self.settings.get("binary", self.name))

    @property
    def normalise(self) -> bool:
        """Normalise outer tar timestamps (default). Off only to measure what it saves."""
        value = self.settings.get("normalise", True)
        if not isinstance(value, bool):
            raise RepositoryMissingError(f"[{self.name}] normalise must be true or false")
        return value

    @abstractmethod
    def version_argv(self) -> list[str]: ...

    def space_warnings(self) -> list[str]:
        """Warnings about free space the engine needs before it refuses to commit (init, check)."""
        return []

    def version(self) -> EngineVersion:
        """Detect the engine version once; refuse versions outside the supported range."""
        if self._version is not None:
            return self._version
        try:
            finished = proc.run(self.version_argv(), env=self.base_env())
        except FileNotFoundError:
            raise EngineUnusableError(f"{self.name} not found (looked for {self.binary!r} on PATH)") from None
        except PermissionError:
            raise EngineUnusableError(f"{self.name} at {self.binary!r} is not executable") from None
        text = (finished.stdout_text + finished.stderr_text).strip()
        found = version_tuple(text) if finished.ok else None
        if found is None:
            raise EngineUnusableError(f"cannot tell the version of {self.binary!r}: {text[:200]!r}")
        want = ".".join(map(str, self.minimum_version))
        if found < self.minimum_version:
            raise EngineUnusableError(f"{self.name} {'.'.join(map(str, found))} is too old: need >= {want}")
        if self.below_version is not None and found >= self.below_version:
            below = ".".join(map(str, self.below_version))
            raise EngineUnusableError(
                f"{self.name} {'.'.join(map(str, found))} is not supported: need >= {want} and < {below}"
            )
        self._version = EngineVersion(self.name, found, text.splitlines()[0])
        return self._version

    # -- environment ----------------------------------------------------------------------------
    ENV_DROP_PREFIXES: ClassVar[tuple[str, ...]] = ()

    def base_env(self) -> dict[str, str]:
        """The caller's environment minus engine variables that could override our config."""
        return {k: v for k, v in os.environ.items() if not k.startswith(self.ENV_DROP_PREFIXES)}

    def password_file(self) -> Path | None:
        path = self.config.password.file
        if path is not None and not path.is_file():
            raise RepositoryMissingError(f"engine password file {path} does not exist")
        return path

    def password_text(self) -> str:
        """The engine password itself, for the recovery sheet: the file's text or the command's output."""
        path = self.password_file()
        if path is not None:
            return path.read_text().rstrip("\n")
        assert self.config.password.command is not None
        finished = proc.run(shlex.split(self.config.password.command), env=self.base_env())
        if not finished.ok:
            raise RepositoryMissingError(f"the password command failed: {finished.stderr_text.strip()[:200]}")
        return finished.stdout_text.rstrip("\n")

    def key_export(self) -> str | None:
        """What opens the repository besides the password (borg's key, printable); None: nothing."""
        return None

    # -- the contract -------------------------------------------------------------------------
    @abstractmethod
    def init_repository(self) -> bool:
        """Create the repository, or adopt an existing one after checking the password. True if created."""

    @abstractmethod
    def store(self, run: str, stream_fd: int, scratch: Path) -> StoreOutcome:
        """Save the stream on `stream_fd` as a pending stream object; nothing at all if it is bad."""

    @abstractmethod
    def commit(self, snapshot: RepoSnapshot, manifest: bytes, record: CommitRecord, scratch: Path) -> str:
        """Save the commit object for `snapshot`; returns the commit object's id."""

    @abstractmethod
    def listing(self) -> RepoListing: ...

    @abstractmethod
    def dump(self, snapshot: RepoSnapshot, out_fd: int) -> proc.Finished:
        """Write the stream of a complete snapshot to `out_fd` (the engine writes there itself)."""

    @abstractmethod
    def read_manifest(self, snapshot: RepoSnapshot) -> bytes: ...

    @abstractmethod
    def delete(self, snapshots: list[RepoSnapshot], orphans: list[Orphan]) -> None:
        """Remove stream objects with their commit objects, and orphans; no space is reclaimed yet."""

    @abstractmethod
    def cleanup(self) -> str:
        """The engine's own space reclamation after delete (restic prune, borg compact)."""

    @abstractmethod
    def check(self, read_data: bool, subset: str | None) -> CheckOutcome: ...

    @abstractmethod
    def classify(self, finished: proc.Finished, action: str) -> Exception:
        """Turn a failed engine run into the AdapterError with the documented exit code."""

    # -- shared helpers -----------------------------------------------------------------------
    def run_checked(self, argv: list[str], action: str, **kwargs: Any) -> proc.Finished:
        finished = proc.run(argv, env=self.env(), **kwargs)
        if not finished.ok:
            raise self.classify(finished, action)
        return finished

    def env(self) -> dict[str, str]:
        return self.base_env()

    def filter_command(self, input_fd: int, report: Path) -> list[str]:
        """Our stream filter as a command line an engine can run (same interpreter, same package)."""
        argv = [
            sys.executable,
            "-m",
            "qtb_adapters.tarstream",
            "--input-fd",
            str(input_fd),
            "--report",
            str(report),
        ]
        if not self.normalise:
            argv.append("--no-normalise")
        return argv

    def run_with_filter_child(
        self, argv: list[str], *, stdin: int, pass_fds: tuple[int, ...], report: Path
    ) -> FilterRun:
        """The engine runs our filter itself and refuses to save when it exits non-zero."""
        report.unlink(missing_ok=True)
        child = proc.start(argv, env=self.env(), stdin=stdin, pass_fds=pass_fds)
        try:
            finished = child.wait()
        except BaseException:
            child.kill()
            child.wait()
            raise
        # An engine that died leaves our filter behind, blocked on the producer: same group, so
        # this ends it (a no-op when everything already exited).
        child.kill()
        raw = _read_filter_report(report)
        report.unlink(missing_ok=True)
        if raw is None:
            return FilterRun(finished, None, None, "the stream filter left no report")
        if raw.get("bad_stream"):
            return FilterRun(finished, None, str(raw.get("error")), None)
        if not raw.get("ok"):
            return FilterRun(finished, None, None, str(raw.get("error")))
        summary = StreamSummary(
            members=[Member(m["name"], m["size"]) for m in raw.get("members", [])],
            stream_bytes=int(raw.get("stream_bytes", 0)),
            output_bytes=int(raw.get("output_bytes", 0)),
        )
        return FilterRun(finished, summary, None, None)

    def run_through_pipe(
        self, argv: list[str], stream_fd: int, *, split: bool = False
    ) -> tuple[proc.Finished, StreamSummary]:
        """We filter the stream into the engine's stdin and close it only once the stream is valid.

        A bad stream: the engine (with its ssh) is killed before it ever sees end-of-file, so it
        cannot save anything. Meanwhile the filter withholds each member's last block, so an
        engine that parses tar (borg import-tar) fails even if we die without killing it.
        `split`: large members go in as head/body/tail pieces (StreamFilter, borg import-tar).
        """
        child = proc.start(argv, env=self.env(), stdin=subprocess.PIPE)
        stream_filter = StreamFilter(write_all_to(child.stdin_fd), normalise=self.normalise, split=split)
        try:
            summary = stream_filter.run(io.FileIO(stream_fd, "rb", closefd=False))
        except StreamRejected as exc:
            child.kill()
            child.wait()
            raise BadInputError(f"bad input stream: {exc}; nothing stored") from None
        except BrokenPipeError:
            finished = child.wait()  # the engine quit early: its status says why
            if finished.ok:
                raise EngineError(f"{self.name} stopped reading the stream") from None
            raise self.classify(finished, "store") from None
        except BaseException:
            child.kill()
            child.wait()
            raise
        child.close_stdin()
        return child.wait(), summary


def engine_names() -> list[str]:
    here = Path(__file__).parent
    names = []
    for path in sorted(here.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if re.search(r"^ENGINE\s*=", text, re.MULTILINE):
            names.append(path.stem)
    return names


def check_engine_name(name: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name not in engine_names():
        raise UsageError(f"unknown engine {name!r} (known: {', '.join(engine_names())})")
    return name


def load_engine(config: AdapterConfig) -> Engine:
    """The engine module named by the config: adapters/<engine>.py, class in its ENGINE."""
    check_engine_name(config.engine)
    module = importlib.import_module(f"{__package__}.{config.engine}")
    engine_class: type[Engine] = module.ENGINE
    return engine_class(config)
