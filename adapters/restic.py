"""restic (>= 0.14): the stream is one file of a snapshot; the commit object is a second snapshot.

Stream snapshot: tags `qtb-stream`, `qtb-run=<run>`, one file /qubes-backup-v4.tar.
Commit snapshot: tags `qtb-commit`, `qtb-run=<run>`, `qtb-of=<stream snapshot id>` and the summary
(`qtb-backup-id=`, `qtb-qubes=a+b`, `qtb-stream-bytes=`, `qtb-added=`, `qtb-members=`,
`qtb-manifest-sha256=`, `qtb-manifest-bytes=`), one file: the sealed manifest. A stream snapshot
is complete exactly when such a commit snapshot exists; restic writes a snapshot file last and
atomically, so there is no half-committed state. The snapshot id of a backup is the stream
snapshot's full id, which never changes (nothing is ever re-tagged).

restic >= 0.17 runs our filter itself (`--stdin-from-command`): a bad stream makes the filter exit
7 and restic saves nothing. Older restic reads `--stdin` from our in-process filter; a bad stream
gets restic killed before it sees end-of-file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, ClassVar

from . import proc
from .base import (
    MANIFEST_FILENAME,
    STREAM_FILENAME,
    CheckOutcome,
    CommitRecord,
    Engine,
    FilterRun,
    Orphan,
    RepoListing,
    RepoSnapshot,
    StoreOutcome,
    iso,
    parse_engine_time,
)
from .errors import (
    BadInputError,
    EngineError,
    NoSpaceError,
    RepositoryLockedError,
    RepositoryMissingError,
    WrongPasswordError,
)

STREAM_TAG = "qtb-stream"
COMMIT_TAG = "qtb-commit"
FROM_COMMAND_VERSION = (0, 17, 0)
RETRY_LOCK_VERSION = (0, 16, 0)
STORE_METHODS = ("auto", "stdin-from-command", "stdin")


def _tag_values(tags: list[str]) -> dict[str, str]:
    values = {}
    for tag in tags:
        key, eq, value = tag.partition("=")
        if eq:
            values[key] = value
    return values


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "", "none") else None
    except ValueError:
        return None


def _summary_line(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("message_type") == "summary":
            return message
    raise EngineError("restic gave no backup summary")


class ResticEngine(Engine):
    name = "restic"
    minimum_version: ClassVar[tuple[int, int, int]] = (0, 14, 0)
    ENV_DROP_PREFIXES = ("RESTIC_",)

    def version_argv(self) -> list[str]:
        return [self.binary, "version"]

    def global_args(self) -> list[str]:
        args = [self.binary, "--repo", self.config.repository]
        password_file = self.password_file()
        if password_file is not None:
            args += ["--password-file", str(password_file)]
        else:
            assert self.config.password.command is not None
            args += ["--password-command", self.config.password.command]
        for option in self.settings.get("options", []):
            args += ["--option", str(option)]
        if self.version().version >= RETRY_LOCK_VERSION and self.config.lock_wait:
            args += ["--retry-lock", f"{self.config.lock_wait}s"]
        return args

    def store_method(self) -> str:
        wanted = str(self.settings.get("store_method", "auto"))
        if wanted not in STORE_METHODS:
            raise RepositoryMissingError(f"[restic] store_method must be one of {', '.join(STORE_METHODS)}")
        from_command_ok = self.version().version >= FROM_COMMAND_VERSION
        if wanted == "stdin-from-command" and not from_command_ok:
            raise EngineError(f"restic {self.version()} has no --stdin-from-command (needs >= 0.17)")
        if wanted == "auto":
            return "stdin-from-command" if from_command_ok else "stdin"
        return wanted

    # -- errors -------------------------------------------------------------------------------
    def classify(self, finished: proc.Finished, action: str) -> Exception:
        # restic >= 0.17 with --json reports errors as JSON lines; older ones as "Fatal: ..." text.
        json_messages: list[str] = []
        text_lines: list[str] = []
        for line in finished.stderr_text.splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                if line.strip():
                    text_lines.append(line.strip())
                continue
            if isinstance(item, dict) and item.get("message_type") in ("exit_error", "error"):
                error = item.get("message") or (item.get("error") or {}).get("message", "")
                if error:
                    json_messages.append(str(error).strip().splitlines()[0])
        fatal = [line for line in text_lines if line.startswith(("Fatal:", "error:"))]
        if json_messages:
            message = json_messages[-1]
        elif fatal:
            message = fatal[0]
        else:
            message = text_lines[-1] if text_lines else f"exit status {finished.returncode}"
        lowered = message.lower() + " " + finished.stderr_text.lower()
        code = finished.returncode
        if code == 10 or "repository does not exist" in lowered or "unable to open config file" in lowered:
            return RepositoryMissingError(f"no restic repository at {self.config.repository}: {message}")
        if code == 12 or "wrong password" in lowered:
            return WrongPasswordError(f"wrong restic password for {self.config.repository}")
        if code == 11 or "already locked" in lowered or "unable to create lock" in lowered:
            holder = next((line for line in text_lines if "already locked" in line), message)
            return RepositoryLockedError(f"restic repository is locked: {holder}")
        if "no space left" in lowered or "insufficient storage" in lowered or "disk quota" in lowered:
            return NoSpaceError(f"out of space during restic {action}: {message}")
        if finished.killed_by is not None:
            return EngineError(f"restic {action} was killed by signal {finished.killed_by}")
        return EngineError(f"restic {action} failed: {message}")

    # -- repository ---------------------------------------------------------------------------
    def init_repository(self) -> bool:
        finished = proc.run([*self.global_args(), "init"], env=self.env())
        if finished.ok:
            return True
        lowered = finished.stderr_text.lower()
        if "already exists" in lowered or "already initialized" in lowered:
            self.run_checked([*self.global_args(), "cat", "config"], "init")  # the password must fit
            return False
        raise self.classify(finished, "init")

    def _backup_args(self, tags: list[str]) -> list[str]:
        args = [*self.global_args(), "--json", "--quiet", "backup"]
        for tag in tags:
            args += ["--tag", tag]
        host = self.settings.get("host")
        if host:
            args += ["--host", str(host)]
        return args

    def store(self, run: str, stream_fd: int, scratch: Path) -> StoreOutcome:
        method = self.store_method()
        argv = [*self._backup_args([STREAM_TAG, f"qtb-run={run}"]), "--stdin-filename", STREAM_FILENAME]
        if method == "stdin":
            finished, summary = self.run_through_pipe([*argv, "--stdin"], stream_fd)
            if not finished.ok:
                raise self.classify(finished, "store")
            result = _summary_line(finished.stdout_text)
        else:
            # restic gives its command /dev/null as stdin; the stream reaches our filter as an
            # inherited descriptor (Go passes on descriptors it did not open itself).
            input_fd = os.dup(stream_fd)
            report = scratch / f"filter-{run}.json"
            try:
                outcome = self.run_with_filter_child(
                    [*argv, "--stdin-from-command", "--", *self.filter_command(input_fd, report)],
                    stdin=subprocess.DEVNULL,
                    pass_fds=(input_fd,),
                    report=report,
                )
            finally:
                os.close(input_fd)
            result = self._settle_filter_run(outcome)
            assert outcome.summary is not None
            summary = outcome.summary
        added = result.get("data_added_packed", result.get("data_added"))
        snapshot_id = str(result["snapshot_id"])
        if len(snapshot_id) < 64:  # restic < 0.17 reports the short id; ids we hand out are full
            snapshot_id = self._full_id(snapshot_id, run)
        return StoreOutcome(snapshot_id, method, _int_or_none(str(added)), summary)

    def _full_id(self, short_id: str, run: str) -> str:
        matches = [s.id for s in self.listing().snapshots if s.id.startswith(short_id) and s.run == run]
        if len(matches) != 1:
            raise EngineError(f"cannot find the snapshot restic just saved ({short_id})")
        return matches[0]

    def _settle_filter_run(self, outcome: FilterRun) -> dict[str, Any]:
        finished = outcome.finished
        saved = None
        if finished.ok:
            try:
                saved = _summary_line(finished.stdout_text)
            except EngineError:
                saved = None
        if outcome.rejected is not None or outcome.filter_error is not None:
            if saved is not None:  # must not happen: restic saved although the filter failed
                self.run_checked([*self.global_args(), "forget", str(saved["snapshot_id"])], "store cleanup")
            if outcome.rejected is not None:
                raise BadInputError(f"bad input stream: {outcome.rejected}; nothing stored")
            if not finished.ok:
                raise self.classify(finished, "store")
            raise EngineError(f"store failed: {outcome.filter_error}")
        if not finished.ok:
            raise self.classify(finished, "store")
        if saved is None:
            raise EngineError("restic gave no backup summary")
        return saved

    def commit(self, snapshot: RepoSnapshot, manifest: bytes, record: CommitRecord, scratch: Path) -> str:
        # A file, not stdin: restic reads a complete file, so no death of ours can cut the manifest.
        directory = scratch / f"commit-{snapshot.run}"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / MANIFEST_FILENAME
        path.write_bytes(manifest)
        tags = [
            COMMIT_TAG,
            f"qtb-run={snapshot.run}",
            f"qtb-of={snapshot.id}",
            f"qtb-backup-id={record.backup_id}",
            f"qtb-qubes={'+'.join(record.qubes)}",
            f"qtb-stream-bytes={record.stream_bytes}",
            f"qtb-added={record.added_bytes if record.added_bytes is not None else 'none'}",
            f"qtb-members={record.members}",
            f"qtb-manifest-sha256={record.manifest_sha256}",
            f"qtb-manifest-bytes={record.manifest_bytes}",
        ]
        try:
            finished = self.run_checked([*self._backup_args(tags), str(path)], "commit")
        finally:
            path.unlink(missing_ok=True)
            try:
                directory.rmdir()
            except OSError:
                pass
        return str(_summary_line(finished.stdout_text)["snapshot_id"])

    def listing(self) -> RepoListing:
        finished = self.run_checked(
            [*self.global_args(), "--json", "snapshots", "--tag", STREAM_TAG, "--tag", COMMIT_TAG], "list"
        )
        try:
            raw = json.loads(finished.stdout_text or "[]")
        except ValueError:
            raise EngineError("restic snapshots gave no JSON") from None
        streams: dict[str, RepoSnapshot] = {}
        commits: list[dict[str, Any]] = []
        for item in raw or []:
            tags = item.get("tags") or []
            values = _tag_values(tags)
            if STREAM_TAG in tags and "qtb-run" in values:
                summary = item.get("summary") or {}
                streams[item["id"]] = RepoSnapshot(
                    id=item["id"],
                    run=values["qtb-run"],
                    time=parse_engine_time(item["time"]),
                    method="file",
                    engine_stream_bytes=summary.get("total_bytes_processed"),
                    engine_added_bytes=summary.get("data_added_packed", summary.get("data_added")),
                    extra={"short_id": item.get("short_id", item["id"][:8])},
                )
            elif COMMIT_TAG in tags:
                commits.append(item)
        orphans = []
        # The first commit object of a stream counts: by time (parsed: restic prints local offsets), then id.
        for item in sorted(commits, key=lambda i: (parse_engine_time(i["time"]), i["id"])):
            values = _tag_values(item.get("tags") or [])
            stream = streams.get(values.get("qtb-of", ""))
            if stream is None or stream.commit is not None:  # the first commit object counts
                kind = "commit object without stream" if stream is None else "second commit object"
                orphans.append(Orphan(item["id"], kind, parse_engine_time(item["time"])))
                continue
            stream.commit = CommitRecord(
                object_id=item["id"],
                backup_id=values.get("qtb-backup-id", ""),
                qubes=[q for q in values.get("qtb-qubes", "").split("+") if q],
                stream_bytes=_int_or_none(values.get("qtb-stream-bytes")) or 0,
                added_bytes=_int_or_none(values.get("qtb-added")),
                members=_int_or_none(values.get("qtb-members")) or 0,
                manifest_sha256=values.get("qtb-manifest-sha256", ""),
                manifest_bytes=_int_or_none(values.get("qtb-manifest-bytes")) or 0,
                committed_at=iso(parse_engine_time(item["time"])),
            )
            stream.extra["manifest_path"] = (item.get("paths") or [""])[0]
        return RepoListing(sorted(streams.values(), key=lambda s: s.time), orphans)

    def dump(self, snapshot: RepoSnapshot, out_fd: int) -> proc.Finished:
        return proc.run(
            [*self.global_args(), "dump", snapshot.id, "/" + STREAM_FILENAME], env=self.env(), stdout=out_fd
        )

    def read_manifest(self, snapshot: RepoSnapshot) -> bytes:
        assert snapshot.commit is not None
        path = snapshot.extra.get("manifest_path") or ""
        finished = self.run_checked(
            [*self.global_args(), "dump", snapshot.commit.object_id, path], "manifest"
        )
        data = finished.stdout
        if hashlib.sha256(data).hexdigest() != snapshot.commit.manifest_sha256:
            raise EngineError(f"the manifest stored for {snapshot.id} does not match its recorded checksum")
        return data

    def delete(self, snapshots: list[RepoSnapshot], orphans: list[Orphan]) -> None:
        # Commit objects first: an interrupted delete leaves a pending stream, never a complete
        # backup whose stream is gone.
        commit_ids = [s.commit.object_id for s in snapshots if s.commit] + [o.id for o in orphans]
        if commit_ids:
            self.run_checked([*self.global_args(), "forget", *commit_ids], "delete")
        if snapshots:
            self.run_checked([*self.global_args(), "forget", *[s.id for s in snapshots]], "delete")

    def run_checked(self, argv: list[str], action: str, **kwargs: Any) -> proc.Finished:
        """On a lock error, remove stale locks once and retry: a `restic dump` that tar2qfile cut
        off (every restore) dies of SIGPIPE and leaves its lock, which blocks forget and prune."""
        try:
            return super().run_checked(argv, action, **kwargs)
        except RepositoryLockedError:
            self._remove_stale_locks()
            return super().run_checked(argv, action, **kwargs)

    def cleanup(self) -> str:
        finished = self.run_checked([*self.global_args(), "prune"], "prune")
        return finished.stdout_text.strip().splitlines()[-1] if finished.stdout_text.strip() else "pruned"

    def _remove_stale_locks(self) -> None:
        # `restic unlock` without --remove-all removes only locks of processes known to be gone
        # (e.g. a restic killed during a store); live locks stay and still make us fail with 6.
        proc.run([*self.global_args(), "unlock"], env=self.env())

    def check(self, read_data: bool, subset: str | None) -> CheckOutcome:
        self._remove_stale_locks()
        argv = [*self.global_args(), "check"]
        scope = "none"
        if subset:
            argv += ["--read-data-subset", subset]
            scope = subset
        elif read_data:
            argv.append("--read-data")
            scope = "all"
        finished = proc.run(argv, env=self.env())
        output = (finished.stdout_text + finished.stderr_text).strip()
        if finished.ok:
            return CheckOutcome(True, output, scope)
        error = self.classify(finished, "check")
        if not isinstance(error, EngineError):
            raise error
        return CheckOutcome(False, output, scope)


ENGINE = ResticEngine
