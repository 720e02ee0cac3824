"""The subcommands, engine-independent. Each returns a JSON-ready dict (the `--json` shape)."""

from __future__ import annotations

import os
import re
import secrets
import select
import signal
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

from . import __version__
from .base import (
    RUN_ID_RE,
    SNAPSHOT_ID_RE,
    CommitRecord,
    Engine,
    Orphan,
    RepoListing,
    RepoSnapshot,
    check_engine_name,
    engine_names,
    iso,
    load_engine,
    parse_engine_time,
    utc_now,
)
from .config import (
    AdapterConfig,
    PasswordSource,
    TomlValue,
    default_config_path,
    load_config,
    write_engine_config,
)
from .errors import (
    AdapterError,
    RepositoryMissingError,
    SnapshotNotFoundError,
    UsageError,
)
from .manifest import cross_check, parse_sealed_manifest, read_bounded
from .retention import Copies, KeepPolicy, per_qube
from .state import CompleteCache, PendingRecord, PendingStore

DEFAULT_PENDING_AGE = timedelta(hours=24)  # drop-pending without --run/--all/--older-than


def check_run_id(run: str) -> str:
    if not RUN_ID_RE.fullmatch(run):
        raise UsageError(f"run id must match [a-z0-9]{{8,40}}: {run!r}")
    return run


def check_snapshot_id(snapshot_id: str) -> str:
    if not SNAPSHOT_ID_RE.fullmatch(snapshot_id):
        raise UsageError(f"snapshot id must match [A-Za-z0-9._:-]{{1,80}}: {snapshot_id!r}")
    return snapshot_id


def parse_duration(text: str) -> timedelta:
    match = re.fullmatch(r"(\d+)([smhdw])", text.strip())
    if not match:
        raise UsageError(f"duration must look like 30m, 12h, 2d or 1w: {text!r}")
    amount, unit = int(match.group(1)), match.group(2)
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    return timedelta(seconds=amount * seconds)


class Session:
    """One subcommand's view: the config, its engine (version checked) and the local state."""

    def __init__(self, config_path: Path | None, engine: str | None) -> None:
        if engine is not None:
            check_engine_name(engine)
        self.config: AdapterConfig = load_config(config_path, engine, engine_names())
        self.engine: Engine = load_engine(self.config)
        self.engine.version()
        self.pending_store = PendingStore(self.config.state_dir, self.config.engine)
        self.complete_cache = CompleteCache(self.config.state_dir, self.config.engine, self.config.repository)

    def listing(self) -> RepoListing:
        """The repository's snapshots, from the engine (and remembered: see CompleteCache)."""
        listing = self.engine.listing()
        self.complete_cache.save([s.to_json() for s in listing.complete])
        return listing

    def delete(self, snapshots: list[RepoSnapshot], orphans: list[Orphan]) -> None:
        """Delete through the engine; the cache is emptied before (a delete that fails halfway can
        leave a stream pending) and after (a listing that ran meanwhile may have saved it again)."""
        self.complete_cache.clear()
        try:
            self.engine.delete(snapshots, orphans)
        finally:
            self.complete_cache.clear()

    def pending_record(self, run: str) -> PendingRecord | None:
        """`store`'s record of a run, if it is for this repository (the config may have changed)."""
        record = self.pending_store.load(run)
        return record if record is not None and record.repository == self.config.repository else None

    def scratch(self) -> Path:
        return self.pending_store.scratch_dir("work")

    def find_complete(self, snapshot_id: str) -> RepoSnapshot:
        """A complete snapshot by id (a unique prefix of at least 8 characters also does)."""
        check_snapshot_id(snapshot_id)
        cached = self.complete_cache.load(snapshot_id)
        if cached is not None:
            try:
                snapshot = RepoSnapshot.from_json(cached)
                if snapshot.complete:
                    return snapshot
            except (TypeError, KeyError, ValueError):
                pass  # a damaged cache entry: list instead
        return self._find_listed(snapshot_id)

    def cached_failure(self, snapshot_id: str, error: Exception) -> Exception:
        """The engine failed on a snapshot found complete (by the cache, or by a listing that may
        since be stale): if a fresh listing no longer shows it complete, that is the error to report
        (exit 4), not the engine's."""
        self.complete_cache.clear()
        try:
            self._find_listed(snapshot_id)
        except SnapshotNotFoundError as gone:
            return gone
        return error

    def _find_listed(self, snapshot_id: str) -> RepoSnapshot:
        listing = self.listing()
        exact = [s for s in listing.snapshots if s.id == snapshot_id]
        found = exact or (
            [s for s in listing.snapshots if s.id.startswith(snapshot_id)] if len(snapshot_id) >= 8 else []
        )
        if len(found) > 1:
            raise SnapshotNotFoundError(f"snapshot id {snapshot_id!r} is ambiguous")
        if not found:
            raise SnapshotNotFoundError(f"unknown snapshot {snapshot_id!r}")
        if not found[0].complete:
            raise SnapshotNotFoundError(f"snapshot {found[0].id} is pending (never committed): not a backup")
        return found[0]


def snapshot_json(snapshot: RepoSnapshot, record: PendingRecord | None = None) -> dict[str, Any]:
    commit = snapshot.commit
    if commit is not None:
        stream_bytes: int | None = commit.stream_bytes
        added: int | None = commit.added_bytes
    elif record is not None:
        stream_bytes, added = record.stream_bytes, record.added_bytes
    else:
        stream_bytes, added = snapshot.engine_stream_bytes, snapshot.engine_added_bytes
    return {
        "id": snapshot.id,
        "state": snapshot.state,
        "time": iso(snapshot.time),
        "run": snapshot.run,
        "backup_id": commit.backup_id if commit else None,
        "qubes": commit.qubes if commit else None,
        "stream_bytes": stream_bytes,
        "added_bytes": added,
        "members": commit.members if commit else (len(record.members) if record else None),
    }


# -- init ---------------------------------------------------------------------------------------
def cmd_init(
    config_path: Path | None,
    *,
    engine: str | None,
    repo: str | None,
    password_file: str | None,
    password_command: str | None,
    generate_password: bool,
    settings: dict[str, TomlValue],
) -> dict[str, Any]:
    path = config_path or default_config_path()
    # A failed init leaves nothing behind: the config as it was, no generated password file.
    previous = path.read_bytes() if path.exists() else None
    created: Path | None = None
    if repo or password_file or password_command or generate_password or settings:
        if not (engine and repo):
            raise UsageError("init with settings needs both --engine and --repo")
        check_engine_name(engine)
        if sum(bool(x) for x in (password_file, password_command, generate_password)) != 1:
            raise UsageError(
                "init needs exactly one of --password-file, --password-command, --generate-password"
            )
        if password_file:
            password = PasswordSource(file=Path(password_file).expanduser().absolute())
            if not password.file.is_file():
                raise RepositoryMissingError(
                    f"no password file {password.file}: write the engine password into it (mode 0600), "
                    "or let init create one with --generate-password"
                )
        elif password_command:
            password = PasswordSource(command=password_command)
        else:
            secret_path = path.parent / f"{engine}.password"
            if not secret_path.exists():
                secret_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as handle:
                    handle.write(secrets.token_urlsafe(32) + "\n")
                created = secret_path
            password = PasswordSource(file=secret_path)
        write_engine_config(path, engine=engine, repository=repo, password=password, engine_settings=settings)
    try:
        session = Session(path, engine)
        created_repository = session.engine.init_repository()
    except BaseException:
        if previous is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(previous)
        if created is not None:
            created.unlink(missing_ok=True)
        raise
    return {
        "engine": session.config.engine,
        "version": str(session.engine.version()),
        "repository": session.config.repository,
        "created": created_repository,
        "config": str(session.config.path),
        "warnings": session.engine.space_warnings(),
    }


# -- store --------------------------------------------------------------------------------------
def cmd_store(session: Session, run: str, stream_fd: int) -> dict[str, Any]:
    check_run_id(run)
    # No listing first (a repository open costs restic ~1 s of key derivation): storing a run that
    # is already committed only leaves a pending leftover; `commit` is where runs are checked.
    outcome = session.engine.store(run, stream_fd, session.scratch())
    record = PendingRecord(
        run=run,
        engine=session.config.engine,
        repository=session.config.repository,
        snapshot_id=outcome.snapshot_id,
        stored_at=iso(utc_now()),
        method=outcome.method,
        stream_bytes=outcome.summary.stream_bytes,
        output_bytes=outcome.summary.output_bytes,
        added_bytes=outcome.added_bytes,
        members=outcome.summary.members,
    )
    session.pending_store.save(record)
    return {
        "run": run,
        "id": outcome.snapshot_id,
        "state": "pending",
        "engine": session.config.engine,
        "method": outcome.method,
        "members": len(outcome.summary.members),
        "stream_bytes": outcome.summary.stream_bytes,
        "output_bytes": outcome.summary.output_bytes,
        "added_bytes": outcome.added_bytes,
    }


# -- pending ------------------------------------------------------------------------------------
def cmd_pending(session: Session, run: str | None) -> dict[str, Any]:
    if run is None:
        listing = session.listing()
        entries = []
        for snapshot in listing.pending:
            record = session.pending_store.load(snapshot.run)
            entry = snapshot_json(snapshot, record if record and record.snapshot_id == snapshot.id else None)
            entry["member_record"] = bool(record and record.snapshot_id == snapshot.id)
            entries.append(entry)
        return {"pending": entries}
    check_run_id(run)
    # The record that `store` wrote when the engine had saved the run is enough here (no repository
    # open, ~1 s for restic): `commit` checks the repository itself.
    record = session.pending_record(run)
    if record is None:
        raise SnapshotNotFoundError(
            f"no pending snapshot for run {run} (its store did not finish, or it was committed or dropped)"
        )
    return {
        "run": run,
        "id": record.snapshot_id,
        "time": record.stored_at,
        "engine": session.config.engine,
        "members": [asdict(m) for m in record.members],
        "stream_bytes": record.stream_bytes,
        "added_bytes": record.added_bytes,
    }


# -- commit -------------------------------------------------------------------------------------
def cmd_commit(session: Session, run: str, source: BinaryIO) -> dict[str, Any]:
    check_run_id(run)
    manifest = read_bounded(source)
    info = parse_sealed_manifest(manifest)
    record = session.pending_record(run)
    if record is None:
        # No record: a retry after a successful commit (same manifest: success), or nothing to commit.
        listing = session.listing()
        done = [s for s in listing.snapshots if s.run == run and s.complete]
        if done:
            return _already_committed(done[0], run, info.sha256)
        if any(s.run == run for s in listing.snapshots):
            raise SnapshotNotFoundError(
                f"run {run} has a pending snapshot but no member record here (store did not finish)"
            )
        raise SnapshotNotFoundError(f"no pending snapshot for run {run}")
    cross_check(info, record.members)
    commit = CommitRecord(
        object_id="",
        backup_id=info.backup_id,
        qubes=info.qubes,
        stream_bytes=record.stream_bytes,
        added_bytes=record.added_bytes,
        members=len(record.members),
        manifest_sha256=info.sha256,
        manifest_bytes=info.size,
        committed_at=iso(utc_now()),
    )
    # Straight to the engine (one repository open less: ~1 s for restic); the listing after it
    # is what decides. The stream object named by the record gets the commit object.
    stream = RepoSnapshot(
        id=record.snapshot_id, run=run, time=parse_engine_time(record.stored_at), method=record.method
    )
    try:
        commit.object_id = session.engine.commit(stream, manifest, commit, session.scratch())
    except AdapterError:
        # e.g. borg: the commit archive exists already (an earlier commit whose record stayed)
        done = [s for s in session.listing().snapshots if s.id == stream.id and s.complete]
        if done:
            session.pending_store.remove(run)
            return _already_committed(done[0], run, info.sha256)
        raise
    # "committed" must mean "restorable": the stream must still be there (a concurrent
    # drop-pending); an orphaned commit object is ignored by every command.
    after = [s for s in session.listing().snapshots if s.id == stream.id and s.complete]
    if not after:
        raise AdapterError(f"the pending snapshot of run {run} vanished while it was being committed")
    session.pending_store.remove(run)
    assert after[0].commit is not None
    if after[0].commit.object_id != commit.object_id:
        # The run had a commit object already (the first one counts; ours is an orphan for
        # drop-pending): the same manifest makes this a retry, another one is refused.
        return _already_committed(after[0], run, info.sha256)
    return _commit_result(after[0])


def _already_committed(snapshot: RepoSnapshot, run: str, manifest_sha256: str) -> dict[str, Any]:
    """A retried commit with the same manifest is a success; anything else is refused."""
    if snapshot.commit and snapshot.commit.manifest_sha256 == manifest_sha256:
        return _commit_result(snapshot)
    raise AdapterError(f"run {run} is already committed as snapshot {snapshot.id} with another manifest")


def _commit_result(snapshot: RepoSnapshot) -> dict[str, Any]:
    result = snapshot_json(snapshot)
    result["commit_object"] = snapshot.commit.object_id if snapshot.commit else None
    return result


# -- manifest, dump -----------------------------------------------------------------------------
def cmd_manifest(session: Session, snapshot_id: str) -> bytes:
    snapshot = session.find_complete(snapshot_id)
    try:
        return session.engine.read_manifest(snapshot)
    except AdapterError as error:
        raise session.cached_failure(snapshot_id, error) from None


def _reader_gone(fd: int) -> bool:
    """True when fd is a pipe whose reader has closed it (POLLERR on the write end)."""
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (OSError, ValueError):
        return False


def cmd_dump(session: Session, snapshot_id: str, out_fd: int) -> None:
    snapshot = session.find_complete(snapshot_id)
    try:
        finished = session.engine.dump(snapshot, out_fd)
    except AdapterError as error:  # e.g. borg failing during a joined dump: gone since it was cached?
        raise session.cached_failure(snapshot_id, error) from None
    if finished.ok:
        return
    # tar2qfile stops reading once it has every member it wants: the engine then dies of SIGPIPE
    # or reports EPIPE. That is the normal end of a restore call, not an error.
    if (
        finished.killed_by == signal.SIGPIPE
        or _reader_gone(out_fd)
        or "broken pipe" in finished.stderr_text.lower()
    ):
        return
    raise session.cached_failure(snapshot_id, session.engine.classify(finished, "dump"))


# -- list ---------------------------------------------------------------------------------------
def cmd_list(session: Session, include_pending: bool) -> dict[str, Any]:
    listing = session.listing()
    snapshots = []
    for snapshot in listing.snapshots:
        if snapshot.complete:
            snapshots.append(snapshot_json(snapshot))
        elif include_pending:
            record = session.pending_store.load(snapshot.run)
            snapshots.append(
                snapshot_json(snapshot, record if record and record.snapshot_id == snapshot.id else None)
            )
    return {"engine": session.config.engine, "repository": session.config.repository, "snapshots": snapshots}


# -- prune --------------------------------------------------------------------------------------
def cmd_prune(
    session: Session,
    policy: KeepPolicy,
    dry_run: bool,
    protected: set[str] | None,
    recorded: set[str] | None = None,
) -> dict[str, Any]:
    """Retention per qube (retention.per_qube); `protected` None protects every qube's newest copy,
    `recorded` None counts every snapshot as a copy dom0 can restore."""
    if policy.empty:
        raise UsageError("prune needs at least one --keep-* option (or a [retention] table in the config)")
    listing = session.listing()
    complete = {s.id: s for s in listing.complete}  # pending ones are not there for prune
    copies = [Copies(s.id, s.time, tuple(s.commit.qubes if s.commit else ())) for s in complete.values()]
    keep, remove, kept = per_qube(copies, policy, protected, recorded)
    result: dict[str, Any] = {
        "policy": policy.as_dict(),
        "dry_run": dry_run,
        "keep": [c.id for c in keep],
        "remove": [c.id for c in remove],
        "qubes": kept,
        "cleanup": None,
    }
    if remove and not dry_run:
        session.delete([complete[c.id] for c in remove], [])
        result["cleanup"] = session.engine.cleanup()
    return result


# -- check --------------------------------------------------------------------------------------
def cmd_check(session: Session, read_data: bool, subset: str | None) -> tuple[dict[str, Any], bool]:
    outcome = session.engine.check(read_data, subset)
    tail = "\n".join(outcome.output.splitlines()[-20:])
    return {
        "ok": outcome.ok,
        "read_data": outcome.read_data,
        "output": tail,
        "warnings": session.engine.space_warnings(),
    }, outcome.ok


# -- version ----------------------------------------------------------------------------------
def cmd_version(session: Session) -> dict[str, Any]:
    """This adapter's version and its engine's (found and range-checked when the session opened),
    for `qtb-pipe version`: no repository is opened."""
    found = session.engine.version()
    return {
        "adapter": __version__,
        "engine": found.engine,
        "engine_version": str(found),
        "engine_line": found.text,
    }


# -- recovery-info ------------------------------------------------------------------------------
def cmd_recovery_info(session: Session) -> dict[str, Any]:
    """What a new system needs to open this repository, for dom0's recovery sheet (`qtb-pipe
    recovery-kit`): where it is, the engine password, and borg's key."""
    engine = session.engine
    return {
        "engine": engine.name,
        "version": str(engine.version()),
        "repository": session.config.repository,
        "password": engine.password_text(),
        "key_export": engine.key_export(),
    }


# -- drop-pending -------------------------------------------------------------------------------
def cmd_drop_pending(
    session: Session, run: str | None, older_than: timedelta | None, drop_all: bool
) -> dict[str, Any]:
    if run is not None:
        check_run_id(run)
    listing = session.listing()
    now = utc_now()
    limit = older_than if older_than is not None else DEFAULT_PENDING_AGE
    victims: list[RepoSnapshot] = []
    for snapshot in listing.pending:
        record = session.pending_store.load(snapshot.run)
        # A long store ends long after the engine's snapshot time: age counts from the end.
        finished_at = snapshot.time
        if record is not None and record.snapshot_id == snapshot.id:
            finished_at = parse_engine_time(record.stored_at)
        if run is not None:
            chosen = snapshot.run == run
        elif drop_all:
            chosen = True
        else:
            chosen = now - finished_at >= limit
        if chosen:
            victims.append(snapshot)
    orphans = []
    if run is None:
        orphans = [o for o in listing.orphans if drop_all or o.time is None or now - o.time >= limit]
    if victims or orphans:
        session.delete(victims, orphans)
    for victim in victims:
        record = session.pending_store.load(victim.run)
        if record is None or record.snapshot_id == victim.id:
            session.pending_store.remove(victim.run)
    # Records whose snapshot is long gone (not just being written by a concurrent store).
    known = {s.id for s in listing.snapshots}
    for stale_run in session.pending_store.runs():
        record = session.pending_store.load(stale_run)
        gone = record is not None and record.snapshot_id not in known
        if gone and (drop_all or now - parse_engine_time(record.stored_at) >= limit):
            session.pending_store.remove(stale_run)
    return {
        "dropped": [{"id": s.id, "run": s.run, "time": iso(s.time)} for s in victims],
        "orphans_removed": [{"id": o.id, "kind": o.kind} for o in orphans],
    }
