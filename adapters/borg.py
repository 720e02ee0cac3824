"""borg (>= 1.2.4, < 2): the stream is one archive; the commit object is a second archive.

Stream archive `qtb-s-<UTC time>-<run>`; commit archive `qtb-c-<same time>-<run>` holding the
sealed manifest as `qtb-manifest.json`, with the summary as its comment (JSON). Saving the commit
archive is one borg transaction, so a stream archive is complete exactly when its commit archive
exists. The snapshot id of a backup is the stream archive's name.

Two ways to put the stream in (`[borg] store_method`):
- `import-tar` (default): `borg import-tar --ignore-zeros`, one borg item per member, chunking
  restarts at each member, so unchanged members cost nothing and changed ones only themselves.
  Our filter runs in this process and feeds borg's stdin: a bad stream gets borg killed before it
  sees end-of-file; and because the filter withholds every member's last block, a borg that sees
  end-of-file early (we were killed) sees a cut member and fails instead of saving.
  Restore: `borg export-tar` (GNU tar headers, which tar2qfile accepts).
  Split (`[borg] split_members`, default true; archive comment method `import-tar-split`): every
  member of at least 4 KiB + 64 KiB + 56 bytes goes in as three items, its first 4 KiB, its body
  and its last 56 bytes (tarstream.SPLIT_*): the inner tar header near a volume chunk's start
  (`GNUSparseFile.<pid>`) and the shim trailer's tag at its end change every run, and each would
  otherwise cost the whole ~1 MiB chunk around it. Restore joins the pieces back (tarjoin.Rejoin
  between export-tar and our stdout). Archives without the marker (`import-tar`, made before
  splitting or with it off) dump exactly as before.
- `create`: the stream as one file, `borg create --content-from-command` running our filter
  (borg saves nothing when the command fails). Restore: `borg extract --stdout`.
"""

from __future__ import annotations

import configparser
import hashlib
import io
import json
import os
import re
import shlex
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from . import proc
from .base import (
    MANIFEST_FILENAME,
    STREAM_FILENAME,
    CheckOutcome,
    CommitRecord,
    Engine,
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
    SnapshotNotFoundError,
    WrongPasswordError,
)
from .tarjoin import JoinError, Rejoin
from .tarstream import write_all_to

STORE_METHODS = ("import-tar", "create")
SPLIT_METHOD = "import-tar-split"  # the recorded method of an import-tar archive of split members
DEFAULT_CHUNKER_PARAMS = "buzhash,19,23,20,4095"  # ~1 MiB chunks: suits disk images (facts section 6)
DEFAULT_COMPRESSION = "lz4"
STREAM_PREFIX = "qtb-s-"
COMMIT_PREFIX = "qtb-c-"
_ARCHIVE_NAME = re.compile(r"qtb-([sc])-(\d{8}T\d{6}\.\d{6}Z)-([a-z0-9]{8,40})")

_MISSING_REPO_IDS = {
    "Repository.DoesNotExist",
    "Repository.InvalidRepository",
    "Repository.ParentPathDoesNotExist",
    "Repository.InvalidRepositoryConfig",
}
_PASSWORD_IDS = {"PassphraseWrong", "PasswordRetriesExceeded", "KeyfileMismatch", "RepoKeyNotFoundError"}
_LOCK_IDS = {"LockTimeout", "LockFailed", "LockError", "NotLocked", "NotMyLock", "LockErrorT"}
_SPACE_IDS = {"Repository.InsufficientFreeSpaceError"}
# borg 1.2 `Repository.check_free_space()`: before every commit it wants 4x the index, the hints,
# `additional_free_space` and, once 10 or more segments can be compacted, one whole segment plus one
# object (max_segment_size + MAX_OBJECT_SIZE, 500 MiB + 20 MiB by default); short of that it refuses.
_DEFAULT_SEGMENT_BYTES = 500 * 2**20
_MAX_OBJECT_BYTES = 20 * 2**20
_REMOTE_REPO = re.compile(r"ssh://.*|[^/]*@[^/]*:.*|[^/:]+:.*")


def _escape_placeholders(text: str) -> str:
    """borg expands {placeholders} in comments; our JSON braces must stay literal."""
    return text.replace("{", "{{").replace("}", "}}")


def _comment(data: dict[str, Any]) -> str:
    return _escape_placeholders(json.dumps(data, sort_keys=True, separators=(",", ":")))


def _parse_comment(text: str) -> dict[str, Any]:
    """borg create expands the placeholders of --comment; borg 1.2 import-tar keeps the text as
    given, doubled braces and all (how every import-tar stream archive's comment reads)."""
    for candidate in (text, text.replace("{{", "{").replace("}}", "}")):
        try:
            value = json.loads(candidate) if candidate else {}
        except ValueError:
            continue
        return value if isinstance(value, dict) else {}
    return {}


class BorgEngine(Engine):
    name = "borg"
    minimum_version: ClassVar[tuple[int, int, int]] = (1, 2, 4)
    below_version: ClassVar[tuple[int, int, int] | None] = (2, 0, 0)
    ENV_DROP_PREFIXES = ("BORG_",)

    def version_argv(self) -> list[str]:
        return [self.binary, "--version"]

    def env(self) -> dict[str, str]:
        env = self.base_env()
        password_file = self.password_file()
        if password_file is not None:
            env["BORG_PASSCOMMAND"] = f"cat -- {shlex.quote(str(password_file))}"
        else:
            assert self.config.password.command is not None
            env["BORG_PASSCOMMAND"] = self.config.password.command
        if self.settings.get("rsh"):
            env["BORG_RSH"] = str(self.settings["rsh"])
        if self.settings.get("remote_path"):
            env["BORG_REMOTE_PATH"] = str(self.settings["remote_path"])
        # Never a question on a terminal nobody watches: answers fixed here.
        env["BORG_RELOCATED_REPO_ACCESS_IS_OK"] = "yes"  # the location comes from our own config
        env["BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK"] = "no"
        env["BORG_CHECK_I_KNOW_WHAT_I_AM_DOING"] = "NO"
        env["BORG_DELETE_I_KNOW_WHAT_I_AM_DOING"] = "NO"
        env["BORG_DISPLAY_PASSPHRASE"] = "no"
        env["BORG_HOSTNAME_IS_UNIQUE"] = "yes"  # lets borg remove locks of its own dead processes
        return env

    def key_export(self) -> str | None:
        """`borg key export --paper`: typed back in with `borg key import --paper` if the repository's
        key is lost or damaged (a keyfile repository cannot be opened without it at all)."""
        return self.run_checked(self.borg("key", "export", "--paper", self.repo), "key export").stdout_text

    def borg(self, command: str, *args: str) -> list[str]:
        return [self.binary, "--log-json", command, "--lock-wait", str(self.config.lock_wait), *args]

    @property
    def repo(self) -> str:
        return self.config.repository

    def store_method(self) -> str:
        method = str(self.settings.get("store_method", "import-tar"))
        if method not in STORE_METHODS:
            raise RepositoryMissingError(f"[borg] store_method must be one of {', '.join(STORE_METHODS)}")
        return method

    def split_members(self) -> bool:
        value = self.settings.get("split_members", True)
        if not isinstance(value, bool):
            raise RepositoryMissingError("[borg] split_members must be true or false")
        return value

    # -- errors -------------------------------------------------------------------------------
    def classify(self, finished: proc.Finished, action: str) -> Exception:
        msgids: set[str] = set()
        messages: list[str] = []
        for line in finished.stderr_text.splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                if line.strip():
                    messages.append(line.strip())
                continue
            if not isinstance(item, dict):
                continue
            if item.get("msgid"):
                msgids.add(str(item["msgid"]))
            text = str(item.get("message") or "")
            if item.get("levelname") in ("ERROR", "CRITICAL") and text:
                if text.startswith("Traceback"):
                    # "Local Exception" says nothing; the traceback's last line names the error.
                    # (borg appends platform details after a blank line).
                    messages.insert(0, text.split("\n\nPlatform:")[0].strip().splitlines()[-1])
                elif text not in ("Local Exception", "Remote Exception"):
                    messages.append(text)
        message = messages[0] if messages else f"exit status {finished.returncode}"
        lowered = finished.stderr_text.lower()
        if msgids & _MISSING_REPO_IDS or ("does not exist" in lowered and "repository" in lowered):
            return RepositoryMissingError(f"no borg repository at {self.repo}: {message}")
        if msgids & _PASSWORD_IDS or "passphrase supplied" in lowered:
            return WrongPasswordError(f"wrong borg passphrase for {self.repo}")
        if msgids & _LOCK_IDS or "failed to create/acquire the lock" in lowered:
            return RepositoryLockedError(f"borg repository is locked: {message}")
        if msgids & _SPACE_IDS or "no space left" in lowered or "insufficient free space" in lowered:
            return NoSpaceError(f"out of space during borg {action}: {message}")
        if "Archive.DoesNotExist" in msgids:
            return SnapshotNotFoundError(message)
        if finished.killed_by is not None:
            return EngineError(f"borg {action} was killed by signal {finished.killed_by}")
        return EngineError(f"borg {action} failed: {message}")

    # -- repository ---------------------------------------------------------------------------
    def init_repository(self) -> bool:
        encryption = str(self.settings.get("encryption", "repokey-blake2"))
        finished = proc.run(self.borg("init", "--encryption", encryption, self.repo), env=self.env())
        if finished.ok:
            return True
        if "Repository.AlreadyExists" in finished.stderr_text or "already exists" in finished.stderr_text:
            self.run_checked(self.borg("list", "--short", self.repo), "init")  # the passphrase must fit
            return False
        raise self.classify(finished, "init")

    def space_warnings(self) -> list[str]:
        if _REMOTE_REPO.fullmatch(self.repo):
            return []  # borg serve checks on the server's side
        path = Path(self.repo).expanduser()
        settings = configparser.ConfigParser()
        try:
            settings.read(path / "config")
            section = settings["repository"] if settings.has_section("repository") else {}
            segment = int(section.get("max_segment_size", _DEFAULT_SEGMENT_BYTES))
            extra = section.get("additional_free_space", "0")
            extra_bytes = int(extra) if extra.isdigit() else 0  # borg's "2G" form: left to borg
            index = max((f.stat().st_size for f in path.glob("index.*")), default=0)
            free = shutil.disk_usage(path).free
        except (OSError, ValueError, configparser.Error):
            return []
        needed = segment + _MAX_OBJECT_BYTES + 4 * index + extra_bytes
        if free >= needed:
            return []
        return [
            f"the borg repository's filesystem has {free / 1e6:.0f} MB free; borg refuses to commit once "
            f"it has segments to compact and less than {needed / 1e6:.0f} MB is free (one segment, "
            "max_segment_size, plus 20 MiB and the index): free space or move the repository"
        ]

    def _archive_args(self) -> list[str]:
        return [
            "--json",
            "--chunker-params", str(self.settings.get("chunker_params", DEFAULT_CHUNKER_PARAMS)),
            "--compression", str(self.settings.get("compression", DEFAULT_COMPRESSION)),
            "--checkpoint-interval", str(int(self.settings.get("checkpoint_interval", 1800))),
        ]  # fmt: skip

    def store(self, run: str, stream_fd: int, scratch: Path) -> StoreOutcome:
        method = self.store_method()
        split = method == "import-tar" and self.split_members()
        if split:
            method = SPLIT_METHOD
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{STREAM_PREFIX}{stamp}-{run}"
        comment = _comment({"qtb": "stream", "run": run, "method": method})
        if method != "create":
            argv = self.borg(
                "import-tar",
                *self._archive_args(),
                "--ignore-zeros",
                "--comment",
                comment,
                f"{self.repo}::{name}",
                "-",
            )
            finished, summary = self.run_through_pipe(argv, stream_fd, split=split)
            if finished.returncode not in (0, 1):
                raise self.classify(finished, "store")
        else:
            report = scratch / f"filter-{run}.json"
            argv = self.borg(
                "create",
                *self._archive_args(),
                "--comment",
                comment,
                "--stdin-name",
                STREAM_FILENAME,
                "--stdin-mode",
                "0600",
                "--content-from-command",
                f"{self.repo}::{name}",
                "--",
                *self.filter_command(0, report),
            )
            outcome = self.run_with_filter_child(argv, stdin=stream_fd, pass_fds=(), report=report)
            finished = outcome.finished
            if outcome.rejected is not None or outcome.filter_error is not None:
                if finished.ok:  # must not happen: borg saved although the command failed
                    self.run_checked(self.borg("delete", f"{self.repo}::{name}"), "store cleanup")
                if outcome.rejected is not None:
                    raise BadInputError(f"bad input stream: {outcome.rejected}; nothing stored")
                if not finished.ok:
                    raise self.classify(finished, "store")
                raise EngineError(f"store failed: {outcome.filter_error}")
            if finished.returncode not in (0, 1):
                raise self.classify(finished, "store")
            assert outcome.summary is not None
            summary = outcome.summary
        stats = self._archive_stats(finished)
        return StoreOutcome(name, method, stats.get("deduplicated_size"), summary)

    @staticmethod
    def _archive_stats(finished: proc.Finished) -> dict[str, Any]:
        try:
            data = json.loads(finished.stdout_text)
            return dict(data["archive"]["stats"])
        except (ValueError, KeyError, TypeError):
            raise EngineError("borg saved no archive (no JSON result)") from None

    def commit(self, snapshot: RepoSnapshot, manifest: bytes, record: CommitRecord, scratch: Path) -> str:
        match = _ARCHIVE_NAME.fullmatch(snapshot.id)
        if not match:
            raise EngineError(f"not a qtb-pipe stream archive: {snapshot.id}")
        name = COMMIT_PREFIX + snapshot.id[len(STREAM_PREFIX) :]
        # A file in its own directory, stored under a relative name: borg reads a complete file,
        # so no death of ours can cut the manifest short.
        directory = scratch / f"commit-{snapshot.run}"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        (directory / MANIFEST_FILENAME).write_bytes(manifest)
        summary = {
            "qtb": "commit",
            "run": snapshot.run,
            "backup_id": record.backup_id,
            "qubes": record.qubes,
            "stream_bytes": record.stream_bytes,
            "added_bytes": record.added_bytes,
            "members": record.members,
            "manifest_sha256": record.manifest_sha256,
            "manifest_bytes": record.manifest_bytes,
        }
        try:
            self.run_checked(
                self.borg(
                    "create",
                    "--json",
                    "--compression",
                    "lz4",
                    "--comment",
                    _comment(summary),
                    f"{self.repo}::{name}",
                    MANIFEST_FILENAME,
                ),
                "commit",
                cwd=str(directory),
            )
        finally:
            (directory / MANIFEST_FILENAME).unlink(missing_ok=True)
            try:
                directory.rmdir()
            except OSError:
                pass
        return name

    def listing(self) -> RepoListing:
        finished = self.run_checked(self.borg("list", "--json", "--format", "{comment}", self.repo), "list")
        try:
            archives = json.loads(finished.stdout_text)["archives"]
        except (ValueError, KeyError, TypeError):
            raise EngineError("borg list gave no JSON") from None
        streams: dict[str, RepoSnapshot] = {}
        commits: dict[str, dict[str, Any]] = {}
        orphans: list[Orphan] = []
        for archive in archives:
            name = str(archive.get("name", ""))
            when = parse_engine_time(str(archive.get("start") or archive.get("time")), naive_is_local=True)
            match = _ARCHIVE_NAME.fullmatch(name)
            if not match:
                if name.startswith(("qtb-s-", "qtb-c-")):  # e.g. NAME.checkpoint: never a backup
                    orphans.append(Orphan(name, "borg checkpoint or partial archive", when))
                continue
            kind, stamp, run = match.groups()
            comment = _parse_comment(str(archive.get("comment", "")))
            if kind == "s":
                streams[f"{stamp}-{run}"] = RepoSnapshot(
                    id=name, run=run, time=when, method=str(comment.get("method", "import-tar"))
                )
            else:
                commits[f"{stamp}-{run}"] = {"name": name, "time": when, "comment": comment}
        for key, commit in commits.items():
            stream = streams.get(key)
            if stream is None:
                orphans.append(Orphan(commit["name"], "commit object without stream", commit["time"]))
                continue
            info = commit["comment"]
            stream.commit = CommitRecord(
                object_id=commit["name"],
                backup_id=str(info.get("backup_id", "")),
                qubes=[str(q) for q in info.get("qubes", [])],
                stream_bytes=int(info.get("stream_bytes", 0)),
                added_bytes=info.get("added_bytes"),
                members=int(info.get("members", 0)),
                manifest_sha256=str(info.get("manifest_sha256", "")),
                manifest_bytes=int(info.get("manifest_bytes", 0)),
                committed_at=iso(commit["time"]),
            )
        return RepoListing(sorted(streams.values(), key=lambda s: s.time), orphans)

    def dump(self, snapshot: RepoSnapshot, out_fd: int) -> proc.Finished:
        if snapshot.method == "create":
            argv = self.borg("extract", "--stdout", f"{self.repo}::{snapshot.id}", STREAM_FILENAME)
        else:
            argv = self.borg("export-tar", f"{self.repo}::{snapshot.id}", "-")
        if snapshot.method != SPLIT_METHOD:
            return proc.run(argv, env=self.env(), stdout=out_fd)
        return self._dump_joined(snapshot, argv, out_fd)

    def _dump_joined(self, snapshot: RepoSnapshot, argv: list[str], out_fd: int) -> proc.Finished:
        """export-tar into a pipe, its split members joined on the way to `out_fd`.

        The reader of `out_fd` going away (tar2qfile has what it wants) ends the join; closing our
        end of borg's pipe then ends borg with EPIPE, and `dump` takes that as the normal end. A
        stream that is not what a split archive gives back is an engine error."""
        read_fd, write_fd = os.pipe()
        try:
            child = proc.start(argv, env=self.env(), stdout=write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        problem: str | None = None
        source = io.FileIO(read_fd, "rb", closefd=True)
        joiner = Rejoin(write_all_to(out_fd))
        try:
            joiner.run(source)
        except BrokenPipeError:  # our reader went away: borg's EPIPE that follows is the normal end
            pass
        except JoinError as exc:
            problem = str(exc)
        except BaseException:
            child.kill()
            child.wait()
            raise
        finally:
            source.close()  # borg, if still writing, gets EPIPE
        finished = child.wait()
        if problem is None:
            return finished
        if joiner.at_eof and not finished.ok:  # borg failed first (ssh lost, killed): it says why
            raise self.classify(finished, "dump")  # (raised: its "Broken pipe" is not a reader gone)
        raise EngineError(f"the split stream archive {snapshot.id} does not join back: {problem}")

    def read_manifest(self, snapshot: RepoSnapshot) -> bytes:
        assert snapshot.commit is not None
        finished = self.run_checked(
            self.borg("extract", "--stdout", f"{self.repo}::{snapshot.commit.object_id}", MANIFEST_FILENAME),
            "manifest",
        )
        if hashlib.sha256(finished.stdout).hexdigest() != snapshot.commit.manifest_sha256:
            raise EngineError(f"the manifest stored for {snapshot.id} does not match its recorded checksum")
        return finished.stdout

    def delete(self, snapshots: list[RepoSnapshot], orphans: list[Orphan]) -> None:
        # One borg transaction for all of them; commit archives listed first all the same.
        names = [s.commit.object_id for s in snapshots if s.commit] + [o.id for o in orphans]
        names += [s.id for s in snapshots]
        if names:
            self.run_checked(self.borg("delete", self.repo, *names), "delete")

    def cleanup(self) -> str:
        self.run_checked(self.borg("compact", self.repo), "prune")
        return "compacted"

    def check(self, read_data: bool, subset: str | None) -> CheckOutcome:
        argv = self.borg("check")
        scope = "none"
        last = re.fullmatch(r"last=(\d+)", subset or "")
        if last:
            # Every backup is two archives; stream archives are the ones named qtb-s-*.
            argv += ["--verify-data", "--glob-archives", f"{STREAM_PREFIX}*", "--last", last.group(1)]
            scope = subset or ""
        elif subset or read_data:
            # borg has no random data subsets (restic's 1/5, 10%): verify everything rather than less.
            argv.append("--verify-data")
            scope = "all"
        finished = proc.run([*argv, self.repo], env=self.env())
        output = (finished.stdout_text + finished.stderr_text).strip()
        if finished.ok:
            return CheckOutcome(True, output, scope)
        error = self.classify(finished, "check")
        if not isinstance(error, EngineError):
            raise error
        return CheckOutcome(False, output, scope)


ENGINE = BorgEngine
