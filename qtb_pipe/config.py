"""dom0 configuration, the backup secret and dom0's own records of snapshots.

Everything lives under a root: `/` on a real dom0, the emulated dom0's root in a qubes-sim world
(which sets QTB_PIPE_ROOT). Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import EXIT_CONFIG, EXIT_USAGE, QtbError

SECRET_RE = re.compile(r"^[0-9a-f]{64}$")
QUBE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")
ENGINES = ("restic", "borg")
RETENTION_KEYS = ("keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")


def root() -> Path:
    return Path(os.environ.get("QTB_PIPE_ROOT", "/"))


def config_path() -> Path:
    return root() / "etc/qtb-pipe/config.toml"


def secret_path() -> Path:
    return root() / "etc/qtb-pipe/secret"


def state_dir() -> Path:
    return root() / "var/lib/qtb-pipe"


@dataclass
class Config:
    backup_qube: str = "backup"
    engine: str = "restic"
    include: list[str] = field(default_factory=list)  # empty: every qube with include_in_backups
    exclude: list[str] = field(default_factory=list)
    start_backup_qube: bool = True
    # how the backup qube's qrexec services find the adapter (a full path if it is not on their PATH)
    adapter_command: str = "qtb-adapter"
    retention: dict[str, int] = field(
        default_factory=lambda: {"keep_daily": 7, "keep_weekly": 4, "keep_monthly": 6}
    )

    def validate(self) -> None:
        if not QUBE_NAME_RE.match(self.backup_qube):
            raise QtbError(f"config: backup_qube {self.backup_qube!r} is not a qube name", EXIT_CONFIG)
        if self.engine not in ENGINES:
            raise QtbError(f"config: engine must be one of {', '.join(ENGINES)}", EXIT_CONFIG)
        if not re.match(r"^[A-Za-z0-9_./-]{1,200}$", self.adapter_command):
            raise QtbError("config: adapter_command must be a plain command name or path", EXIT_CONFIG)
        for name in self.include + self.exclude:
            if not QUBE_NAME_RE.match(name):
                raise QtbError(f"config: {name!r} is not a qube name", EXIT_CONFIG)
        for key, value in self.retention.items():
            if key not in RETENTION_KEYS or not isinstance(value, int) or value < 0:
                raise QtbError(f"config: retention.{key} must be one of {RETENTION_KEYS} >= 0", EXIT_CONFIG)

    def to_toml(self) -> str:
        def q(s: str) -> str:
            return json.dumps(s)  # a JSON string is a valid TOML basic string

        lines = [
            "# qtb-pipe dom0 configuration (see `qtb-pipe config check`)",
            f"backup_qube = {q(self.backup_qube)}",
            f"engine = {q(self.engine)}",
            "# qubes to back up; empty = every qube whose include_in_backups is true",
            f"include = [{', '.join(q(n) for n in self.include)}]",
            f"exclude = [{', '.join(q(n) for n in self.exclude)}]",
            "# start the backup qube if it is not running",
            f"start_backup_qube = {'true' if self.start_backup_qube else 'false'}",
            "# the adapter in the backup qube (a full path if it is not on the qrexec services' PATH)",
            f"adapter_command = {q(self.adapter_command)}",
            "",
            "[retention]",
            *(f"{k} = {v}" for k, v in self.retention.items()),
        ]
        return "\n".join(lines) + "\n"


def load_config() -> Config:
    path = config_path()
    if not path.is_file():
        raise QtbError(f"no configuration at {path}: run `qtb-pipe init` first", EXIT_CONFIG)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise QtbError(f"{path}: not valid TOML: {e}", EXIT_CONFIG) from None
    known = {f for f in Config.__dataclass_fields__}
    unknown = set(data) - known
    if unknown:
        raise QtbError(f"{path}: unknown setting(s): {', '.join(sorted(unknown))}", EXIT_CONFIG)
    try:
        cfg = Config(**data)
    except TypeError as e:
        raise QtbError(f"{path}: {e}", EXIT_CONFIG) from None
    cfg.validate()
    return cfg


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file atomically, created with `mode` from the start (no window with wider access,
    whatever the umask); a failed write leaves no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def generate_secret() -> str:
    return secrets.token_hex(32)  # 256 bits


def load_secret() -> str:
    path = secret_path()
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise QtbError(f"no backup secret at {path}: run `qtb-pipe init`", EXIT_CONFIG) from None
    except PermissionError:
        raise QtbError(f"cannot read {path}: run as the user that ran `qtb-pipe init`", EXIT_CONFIG) from None
    if not SECRET_RE.match(text):
        raise QtbError(f"{path} does not hold a qtb-pipe secret (64 hex digits)", EXIT_CONFIG)
    return text


def parse_recovery_key(text: str) -> str:
    """The recovery key as shown by `init`: 64 hex digits, grouped with dashes/spaces for reading."""
    compact = re.sub(r"[\s-]", "", text.strip().lower())
    if not SECRET_RE.match(compact):
        raise QtbError("a recovery key is 64 hexadecimal digits (dashes and spaces are ignored)", EXIT_USAGE)
    return compact


def format_recovery_key(secret: str) -> str:
    return "-".join(secret[i : i + 8] for i in range(0, 64, 8))


# --- dom0's records of committed snapshots ------------------------------------------------
@dataclass
class SnapshotRecord:
    id: str
    engine: str
    backup_id: str
    time: str
    qubes: list[str]
    stream_bytes: int
    manifest_sha256: str


def records_dir() -> Path:
    return state_dir() / "snapshots"


def save_record(rec: SnapshotRecord) -> None:
    write_private(records_dir() / f"{rec.engine}-{rec.id}.json", json.dumps(asdict(rec), indent=2).encode())


def load_records() -> dict[tuple[str, str], SnapshotRecord]:
    out: dict[tuple[str, str], SnapshotRecord] = {}
    if not records_dir().is_dir():
        return out
    for path in sorted(records_dir().glob("*.json")):
        try:
            rec = SnapshotRecord(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            continue  # a damaged record is ignored, never trusted
        out[(rec.engine, rec.id)] = rec
    return out


def forget_record(engine: str, snapshot_id: str) -> None:
    (records_dir() / f"{engine}-{snapshot_id}.json").unlink(missing_ok=True)
