"""dom0's view of `qtb-adapter` in the backup qube: command lines out, schema-checked JSON in.

The backup qube is not trusted: every answer is size-bounded, parsed as JSON, and checked field
by field (types, patterns, ranges) before dom0 uses it.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from scrypt_shim.shim import BACKUP_ID_RE, MAX_MANIFEST_BYTES, QUBE_NAME_RE

from . import proc, qubes
from .errors import EXIT_FAILED, EXIT_QUBE, EXIT_SNAPSHOT, QtbError

SNAPSHOT_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,80}")  # the adapter's own ids (docs/design.md)
MEMBER_RE = re.compile(r"[A-Za-z0-9._/+-]{1,200}")
TIME_RE = re.compile(r"[0-9T:.+ Z-]{1,40}")
VERSION_RE = re.compile(r"[0-9A-Za-z.+-]{1,40}")
PRINTABLE_LINE_RE = re.compile(r"[ -~]{1,200}")
QUBE_OR_DOM0_RE = re.compile(f"dom0|{QUBE_NAME_RE.pattern}")
MAX_JSON = 8 * 1024 * 1024
# Adapter exit codes (docs/adapters.md, Exit codes) → what the user should do.
ADAPTER_EXIT = {
    3: ("the backup qube's repository is not initialised: run `qtb-adapter init` there", EXIT_QUBE),
    4: ("unknown or pending snapshot", EXIT_SNAPSHOT),
    5: ("the engine password in the backup qube is wrong", EXIT_QUBE),
    6: ("the repository is locked by another run; retry later", EXIT_QUBE),
    8: ("the engine in the backup qube is missing or too old", EXIT_QUBE),
    9: ("the backup qube's repository ran out of space", EXIT_FAILED),
    126: ("qtb-adapter is not executable in the backup qube", EXIT_QUBE),
    127: ("qtb-adapter is not installed in the backup qube (see README: install on Qubes)", EXIT_QUBE),
}


ADAPTER_ERROR_RE = re.compile(rb"qtb-adapter: error \(exit ([0-9]{1,3})\): ")


def adapter_failure(stderr: bytes, exit_code: int | None = None) -> tuple[str, int]:
    """The one-line reason and dom0 exit code of a failed adapter call (`exit_code`: its own), or of
    qvm-backup / qvm-backup-restore: the adapter's exit code does not reach dom0 through qubesd, so
    its error line carries it (docs/adapters.md)."""
    if exit_code is None and (found := ADAPTER_ERROR_RE.findall(stderr[-proc.MAX_ERROR_BYTES :])):
        exit_code = int(found[-1])
    hint, code = ADAPTER_EXIT.get(exit_code, (None, EXIT_FAILED))
    return proc.one_line(stderr, "no message") + (f" ({hint})" if hint else ""), code


def check_snapshot_id(value: str) -> str:
    if not isinstance(value, str) or not SNAPSHOT_ID_RE.fullmatch(value):
        raise QtbError(f"not a snapshot id: {str(value)[:80]!r}", 2)
    return value


def _field(
    obj: dict, key: str, kind: type, optional: bool = False, pattern: re.Pattern[str] | None = None
) -> Any:
    """One field of a hostile answer: present (unless optional), of its type, a bounded integer, a
    string that fully matches `pattern`."""
    if key not in obj or obj[key] is None:
        if optional:
            return None
        raise QtbError(f"backup qube sent malformed data: missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise QtbError(f"backup qube sent malformed data: {key!r} has the wrong type")
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < 1 << 62:
        raise QtbError(f"backup qube sent malformed data: {key!r} out of range")
    if pattern is not None and not pattern.fullmatch(value):
        raise QtbError(f"backup qube sent malformed data: {key!r} is not what it should be")
    return value


def malformed(command: str) -> QtbError:
    return QtbError(f"backup qube sent malformed data for `qtb-adapter {command}`")


def _strings(
    answer: dict, key: str, command: str, pattern: re.Pattern[str], limit: float, optional: bool = False
) -> list[str]:
    """The list of at most `limit` strings under `key` of a hostile answer, each fully matching `pattern`
    (`limit` may be math.inf: bounded only by the answer's size, MAX_JSON)."""
    if (items := answer.get(key)) is None and optional:
        return []
    if (
        not isinstance(items, list)
        or len(items) > limit
        or not all(isinstance(i, str) and pattern.fullmatch(i) for i in items)
    ):
        raise malformed(command)
    return items


def _objects(answer: dict, key: str, command: str) -> list[dict]:
    """The list of JSON objects under `key` of a hostile answer."""
    items = answer.get(key)
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise malformed(command)
    return items


@dataclass
class Snapshot:
    snapshot: str  # the wire's `id`, named as every dom0 answer names it
    state: str
    time: str
    backup_id: str | None
    qube_names: list[str]  # `qubes` on the wire; every dom0 answer keeps `qubes` for {qube: …}
    stream_bytes: int | None
    added_bytes: int | None


# each field of a `qtb-adapter list` entry: (type, optional, pattern), and `qubes` (_strings)
SNAPSHOT_FIELDS: dict[str, tuple[type, bool, re.Pattern[str] | None]] = {
    "id": (str, False, SNAPSHOT_ID_RE),
    "state": (str, False, re.compile("complete|pending")),
    "time": (str, False, TIME_RE),
    "backup_id": (str, True, BACKUP_ID_RE),
    "stream_bytes": (int, True, None),
    "added_bytes": (int, True, None),
}


@dataclass
class Member:
    name: str
    size: int


class Adapter:
    def __init__(self, qube: str, engine: str, command: str = "qtb-adapter") -> None:
        self.qube, self.engine, self.command = qube, engine, command

    def _call(self, *args: str, input: bytes | None = None, limit: int = MAX_JSON) -> bytes:
        argv = [self.command, *args, "--engine", self.engine]
        res = qubes.run_in_qube(self.qube, argv, input=input, stdout_limit=limit)
        if res.code != 0:
            if b"is not running" in res.stderr and res.code == 1 and not res.stdout:
                raise QtbError(
                    f"backup qube '{self.qube}' is not running: start it (qvm-start {self.qube})", EXIT_QUBE
                )
            detail, code = adapter_failure(res.stderr, res.code)
            raise QtbError(f"qtb-adapter {args[0]} in '{self.qube}' failed: {detail}", code)
        return res.stdout

    def _json(self, *args: str, input: bytes | None = None) -> dict:
        """A JSON object answer, about this engine when it names one."""
        raw = self._call(*args, "--json", input=input)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise QtbError(f"backup qube sent invalid JSON for `qtb-adapter {args[0]}`") from None
        if not isinstance(data, dict) or data.get("engine", self.engine) != self.engine:
            raise malformed(args[0])
        return data

    def location(self, *args: str) -> str:
        """A location string for qvm-backup / qvm-backup-restore (eval'd by the qrexec service)."""
        return " ".join([self.command, *args, "--engine", self.engine])

    def store_location(self, run_id: str) -> str:
        return self.location("store", "--run", run_id)

    def dump_location(self, snapshot_id: str) -> str:
        return self.location("dump", check_snapshot_id(snapshot_id))

    def snapshots(self) -> list[Snapshot]:
        out = []
        for item in _objects(self._json("list"), "snapshots", "list"):
            found = {key: _field(item, key, *spec) for key, spec in SNAPSHOT_FIELDS.items()}
            found["qube_names"] = _strings(item, "qubes", "list", QUBE_OR_DOM0_RE, 1000, optional=True)
            out.append(Snapshot(found.pop("id"), **found))
        return out

    def complete(self) -> list[Snapshot]:
        return [s for s in self.snapshots() if s.state == "complete"]

    def pending_members(self, run_id: str) -> list[Member]:
        members = _objects(self._json("pending", "--run", run_id), "members", "pending")
        return [Member(_field(m, "name", str, pattern=MEMBER_RE), _field(m, "size", int)) for m in members]

    def commit(self, run_id: str, sealed_manifest: bytes) -> dict:
        data = self._json("commit", "--run", run_id, input=sealed_manifest)
        _field(data, "id", str, pattern=SNAPSHOT_ID_RE)
        return data

    def manifest(self, snapshot_id: str) -> bytes:
        """The sealed manifest of a complete snapshot (the adapter refuses unknown and pending ones)."""
        try:
            return self._call("manifest", check_snapshot_id(snapshot_id), limit=MAX_MANIFEST_BYTES)
        except QtbError as e:
            if e.code != EXIT_SNAPSHOT:
                raise
            raise QtbError(
                f"{e}: see `qtb-pipe list` (a pending snapshot was never committed and cannot be restored)",
                EXIT_SNAPSHOT,
            ) from None

    def ping(self, state: str, message: str = "") -> None:
        """The backup qube's [monitoring] ping_url (dom0 has no network); never fails a run."""
        with contextlib.suppress(QtbError):
            self._call("ping", state, input=message.encode())  # bounded there

    def prune(
        self, retention: dict[str, int], dry_run: bool, protect: list[str], recorded: list[str]
    ) -> list[str]:
        """The snapshots it removed (or would): only snapshots dom0 recorded count as a protected qube's
        copies (ids on stdin: many)."""
        args = ["prune", f"--protect={','.join(protect)}", "--recorded=-"]
        for key, value in retention.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        if dry_run:
            args.append("--dry-run")
        answer = self._json(*args, input="".join(f"{i}\n" for i in recorded).encode())
        return _strings(answer, "remove", "prune", SNAPSHOT_ID_RE, math.inf)  # years of nights: thousands

    def check(self, read_data_subset: str | None = None) -> tuple[bool, str, list[str]]:
        """Whether the check passed, the engine's output and the warnings (free space…), bounded and
        printable; warnings that are not strings are left out."""
        data = self._json("check", *(["--read-data-subset", read_data_subset] if read_data_subset else []))
        warnings = data.get("warnings") if isinstance(data.get("warnings"), list) else []
        shown = [proc.printable(w, 300).replace("\n", " ") for w in warnings if isinstance(w, str)][:5]
        output = data.get("output")
        return data.get("ok") is True, proc.printable(output, 4000) if isinstance(output, str) else "", shown

    def version(self) -> dict[str, str]:
        """The adapter's version and its engine's: short printable text that dom0 only shows."""
        data = self._json("version")
        fields = {"adapter": VERSION_RE, "engine_version": VERSION_RE, "engine_line": PRINTABLE_LINE_RE}
        found = {key: _field(data, key, str, pattern=pattern) for key, pattern in fields.items()}
        return {"qube": self.qube, "engine": self.engine, "adapter_version": found.pop("adapter"), **found}

    def recovery_info(self) -> dict[str, str | None]:
        """Where the repository is, its engine password and borg's key, for the recovery sheet:
        hostile text that dom0 only prints (bounded, printable, shell-quoted where it is a command)."""
        data = self._json("recovery-info")
        out = {}
        for key, limit in (("version", 40), ("repository", 1000), ("password", 1000), ("key_export", 20000)):
            value = _field(data, key, str, optional=key == "key_export")
            lines = 1000 if key == "key_export" else 1
            if value is not None and (
                len(value) > limit or proc.printable(value, limit) != value or value.count("\n") >= lines
            ):
                raise QtbError(f"backup qube sent an unprintable or oversized {key!r} for `recovery-info`")
            out["engine_version" if key == "version" else key] = value  # as every dom0 answer names it
        return out
