"""Local records of stored-but-not-committed runs (the member list `pending` and `commit` need).

They live in the backup qube (`<state_dir>/pending/<run>.json`), are written only after the engine
has saved the pending snapshot, and are removed by `commit` and `drop-pending`. The repository
never depends on them: without its record a pending snapshot simply cannot be committed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .tarstream import Member


def write_json_private(path: Path, data: object, *, durable: bool) -> None:
    """Replace `path` (mode 0600, in a 0700 directory) with `data` as JSON, all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the replace


@dataclass
class PendingRecord:
    run: str
    engine: str
    repository: str
    snapshot_id: str
    stored_at: str  # ISO 8601 UTC, when the engine finished
    method: str
    stream_bytes: int
    output_bytes: int
    added_bytes: int | None
    members: list[Member] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> PendingRecord:
        members = [Member(str(m["name"]), int(m["size"])) for m in raw.get("members", [])]  # type: ignore[union-attr, index, call-overload]
        values = {k: v for k, v in raw.items() if k != "members"}
        return cls(**values, members=members)  # type: ignore[arg-type]


class PendingStore:
    def __init__(self, state_dir: Path, engine: str) -> None:
        self.directory = state_dir / "pending" / engine

    def path(self, run: str) -> Path:
        return self.directory / f"{run}.json"

    def save(self, record: PendingRecord) -> None:
        write_json_private(self.path(record.run), record.to_json(), durable=True)

    def load(self, run: str) -> PendingRecord | None:
        try:
            raw = json.loads(self.path(run).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # a torn record is as good as none: the run cannot be committed
        try:
            return PendingRecord.from_json(raw)
        except (TypeError, KeyError, ValueError):
            return None

    def remove(self, run: str) -> None:
        try:
            self.path(run).unlink()
        except FileNotFoundError:
            pass

    def runs(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.json"))

    def scratch_dir(self, purpose: str) -> Path:
        """A private directory for small files (reports, a manifest being committed)."""
        path = self.directory.parent.parent / "tmp" / purpose
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path


class CompleteCache:
    """The complete snapshots of the last full listing (`<state_dir>/complete/<engine>.json`).

    Why: every engine start costs restic ~0.7 s of key derivation, and a restore runs `dump` three
    times (qvm-backup-restore's three qubes.Restore calls) after `list` and `manifest`. Listing the
    repository again before each dump doubled that. Only "complete" is cached, never "pending", and
    a snapshot stays complete until it is deleted: deleting through the adapter empties the cache,
    and one deleted behind its back makes the engine's own dump fail, as it would have anyway.
    Only exact ids are looked up here; anything else lists the repository.
    """

    FORMAT = 1

    def __init__(self, state_dir: Path, engine: str, repository: str) -> None:
        self.path = state_dir / "complete" / f"{engine}.json"
        self.repository = repository

    def save(self, snapshots: list[dict[str, object]]) -> None:
        data = {"format": self.FORMAT, "repository": self.repository, "snapshots": snapshots}
        try:
            write_json_private(self.path, data, durable=False)
        except OSError:
            pass  # only a cache: the next command lists the repository instead

    def load(self, snapshot_id: str) -> dict[str, object] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not (
            isinstance(data, dict)
            and data.get("format") == self.FORMAT
            and data.get("repository") == self.repository
            and isinstance(data.get("snapshots"), list)
        ):
            return None
        return next(
            (s for s in data["snapshots"] if isinstance(s, dict) and s.get("id") == snapshot_id), None
        )

    def clear(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass
