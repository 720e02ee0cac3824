"""dom0's own records of committed snapshots, one file each in <state>/snapshots/, written atomically
once dom0 has confirmed the commit. Only these are trusted for what a snapshot holds: the backup
qube's answers never create, change or remove a record's meaning."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import state_dir, write_private
from .errors import EXIT_CONFIG, EXIT_VERIFY, QtbError


@dataclass
class SnapshotRecord:
    id: str
    engine: str
    backup_id: str
    time: str  # when it was made (the manifest's `created`), ISO 8601 UTC
    qubes: dict[str, str | None]  # each qube it holds -> its fingerprint then (None: always backed up)
    stream_bytes: int
    manifest_sha256: str


def records_dir() -> Path:
    return state_dir() / "snapshots"


def record_path(engine: str, snapshot_id: str) -> Path:
    return records_dir() / f"{engine}-{snapshot_id}.json"


UTC_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\+00:00")  # as backup writes it


def well_typed(rec: SnapshotRecord) -> bool:
    """Every field of the type it is written with (times compare as text: one format only)."""
    texts = (rec.id, rec.engine, rec.backup_id, rec.time, rec.manifest_sha256)
    return (
        all(type(t) is str for t in texts)
        and type(rec.stream_bytes) is int
        and bool(UTC_TIME.fullmatch(rec.time))
        and type(rec.qubes) is dict
        and all(type(q) is str and (f is None or type(f) is str) for q, f in rec.qubes.items())
    )


def load_records() -> dict[tuple[str, str], SnapshotRecord]:
    """Every record, keyed (engine, id). A damaged one stops the command (exit 3, named): silently
    skipping it would make its snapshot look unrecorded and its qubes' older copies the newest."""
    out: dict[tuple[str, str], SnapshotRecord] = {}
    try:  # not glob(): it reads a directory it cannot list as an empty one, i.e. as no records
        paths = sorted(p for p in records_dir().iterdir() if p.suffix == ".json")
    except FileNotFoundError:  # none yet
        paths = []
    except OSError as e:
        raise QtbError(f"cannot read dom0's records in {records_dir()}: {e.strerror}", EXIT_CONFIG) from None
    for path in paths:
        try:
            rec = SnapshotRecord(**json.loads(path.read_text()))
            if isinstance(rec.qubes, list):  # records of qtb-pipe 0.1 had no fingerprints
                rec.qubes = dict.fromkeys(rec.qubes)
            if not well_typed(rec) or path.name != record_path(rec.engine, rec.id).name:
                raise ValueError
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise QtbError(
                f"dom0 record {path} is damaged ({type(e).__name__}): move it away", EXIT_CONFIG
            ) from None
        out[(rec.engine, rec.id)] = rec
    return out


def save_record(rec: SnapshotRecord) -> None:
    """A record of the same id with another manifest is never replaced (a backup qube answering a
    commit with an older snapshot's id must not erase that snapshot's record)."""
    if (known := load_records().get((rec.engine, rec.id))) and known.manifest_sha256 != rec.manifest_sha256:
        raise QtbError(
            f"dom0 already has a record of snapshot {rec.id} with another manifest: nothing was recorded",
            EXIT_VERIFY,
        )
    write_private(record_path(rec.engine, rec.id), json.dumps(asdict(rec), indent=2).encode())


def begin_prune(engine: str, listed: set[str]) -> set[str]:
    """Before a prune: note the complete snapshots the repository lists, with those an interrupted
    prune had noted, so that the records of what a killed prune removed are forgotten by the next."""
    journal = state_dir() / f"pruning-{engine}.json"
    try:
        noted = set(json.loads(journal.read_text())) | listed
    except FileNotFoundError:
        noted = set(listed)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise QtbError(f"dom0 file {journal} is damaged: move it away", EXIT_CONFIG) from None
    write_private(journal, json.dumps(sorted(noted)).encode())
    return noted


def end_prune(engine: str, noted: set[str], listed: set[str]) -> set[str]:
    """After a prune: forget the records of noted snapshots the repository no longer lists."""
    removed = noted - listed
    for snapshot_id in removed:
        record_path(engine, snapshot_id).unlink(missing_ok=True)
    (state_dir() / f"pruning-{engine}.json").unlink(missing_ok=True)
    return removed


def check_records_writable() -> None:
    """Before a commit: a snapshot committed without a dom0 record could only be restored with
    --new-system: a probe well over a record's size (an empty file is created on a full disk too)."""
    probe = records_dir() / f".probe-{os.getpid()}"
    try:
        write_private(probe, bytes(64 * 1024))
        probe.unlink()
    except QtbError as e:  # write_private names the file and why
        raise QtbError(
            f"{e}: dom0's snapshot records cannot be written; nothing was backed up", EXIT_CONFIG
        ) from None


def catalog(engine: str, as_of: str | None = None) -> dict[str, list[SnapshotRecord]]:
    """The per-qube view of dom0's records (one engine): every qube's copies, oldest first (only
    those made at or before `as_of`, an ISO time, when given). dom0's home is the qube "dom0"."""
    copies: dict[str, list[SnapshotRecord]] = {}
    for rec in sorted(load_records().values(), key=lambda r: r.time):
        if rec.engine == engine and (as_of is None or rec.time <= as_of):
            for qube in rec.qubes:
                copies.setdefault(qube, []).append(rec)
    return copies
