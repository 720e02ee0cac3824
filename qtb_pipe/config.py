"""dom0 configuration, the backup secret and dom0's own records of snapshots.

Everything lives under a root: `/` on a real dom0, the emulated dom0's root in a qubes-sim world
(which sets QTB_PIPE_ROOT). Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from scrypt_shim.shim import QUBE_NAME_RE

from .errors import EXIT_CONFIG, EXIT_FAILED, EXIT_USAGE, QtbError

SECRET_RE = re.compile(r"[0-9a-f]{64}")
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
    # seconds without a word from qvm-backup before it is stopped (0: wait forever)
    stall_timeout: int = 1800
    retention: dict[str, int] = field(
        default_factory=lambda: {"keep_daily": 7, "keep_weekly": 4, "keep_monthly": 6}
    )
    # shell commands run in dom0 around the jobs (cli.run_hooked): before, after, on_error; timeout
    hooks: dict[str, list[str] | int] = field(default_factory=dict)

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise QtbError(f"config: engine must be one of {', '.join(ENGINES)}", EXIT_CONFIG)
        if not re.fullmatch(r"[A-Za-z0-9_./-]{1,200}", self.adapter_command):
            raise QtbError("config: adapter_command must be a plain command name or path", EXIT_CONFIG)
        for name in [self.backup_qube, *self.include, *self.exclude]:
            if not QUBE_NAME_RE.fullmatch(name):
                raise QtbError(f"config: {name!r} is not a qube name", EXIT_CONFIG)
        if self.stall_timeout < 0:
            raise QtbError("config: stall_timeout must be a whole number of seconds >= 0", EXIT_CONFIG)
        for key, value in self.retention.items():
            if key not in RETENTION_KEYS:
                raise QtbError(
                    f"config: retention.{key} is not one of {', '.join(RETENTION_KEYS)}", EXIT_CONFIG
                )
            if value < 0:  # restic and borg users read -1 as "keep all"; it would remove everything
                raise QtbError(f"config: retention.{key} must be a whole number >= 0", EXIT_CONFIG)
        for key, value in self.hooks.items():
            commands = key in HOOK_STAGES and type(value) is list and all(type(c) is str for c in value)
            if not (commands or (key == "timeout" and type(value) is int and value > 0)):
                raise QtbError(f"config: hooks.{key}: {HOOKS_WORDS}", EXIT_CONFIG)

    def to_toml(self) -> str:
        """The file, each setting under the comment SETTING_TYPES gives it; tables last. JSON's
        strings, lists, numbers and booleans are TOML's."""
        lines = ["# qtb-pipe dom0 configuration (see `qtb-pipe config check`)"]

        def toml(v: object) -> str:  # raw UTF-8: TOML has no escapes for JSON's surrogate pairs
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")  # nor a raw DEL

        for name, (_, _, _, about) in SETTING_TYPES.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                lines += ["", f"# {about}", f"[{name}]", *(f"{k} = {toml(v)}" for k, v in value.items())]
            else:
                lines += [f"# {about}", f"{name} = {toml(value)}"]
        return "\n".join(lines) + "\n"


def load_config() -> Config:
    path = config_path()
    if not path.is_file():
        raise QtbError(f"no configuration at {path}: run `qtb-pipe init` first", EXIT_CONFIG)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise QtbError(f"{path}: not valid TOML: {e}", EXIT_CONFIG) from None
    unknown = set(data) - set(SETTING_TYPES)
    if unknown:
        raise QtbError(f"{path}: unknown setting(s): {', '.join(sorted(unknown))}", EXIT_CONFIG)
    for key, value in data.items():
        check_setting_type(path, key, value)
    cfg = Config(**data)
    cfg.validate()
    return cfg


# Each setting: its TOML type (outer, and of the items or values), what to tell the user who got it
# wrong, and the comment above it in the file `init` writes (the order is the file's)
SETTING_TYPES: dict[str, tuple[type, type | None, str, str]] = {
    "backup_qube": (str, None, "a qube name in quotes", "the qube that runs qtb-adapter"),
    "engine": (str, None, '"restic" or "borg"', "restic or borg (another: --engine)"),
    "include": (list, str, 'a list of qube names, e.g. ["work", "vault"]',
                "qubes to back up; empty = every qube whose include_in_backups is true"),
    "exclude": (list, str, 'a list of qube names, e.g. ["work", "vault"]', "qubes never backed up"),
    "start_backup_qube": (bool, None, "true or false (no quotes)", "start the backup qube when it is off"),
    "adapter_command": (str, None, "a command name or path in quotes",
                        "the adapter in the backup qube (a full path if it is not on qrexec's PATH)"),
    "stall_timeout": (int, None, "a whole number of seconds (0: never)",
                      "stop a backup or restore that makes no progress for this many seconds (0: never)"),
    "retention": (dict, int, "a [retention] table of keep_* = whole numbers",
                  "keep_last/daily/weekly/monthly/yearly, applied to each qube's own copies"),
    "hooks": (dict, None, "a [hooks] table", "before/after/on_error = [shell commands] around backup, "
              "prune, verify, check; timeout = seconds (README: Hooks)"),
}  # fmt: skip
HOOK_STAGES = ("before", "after", "on_error")
HOOKS_WORDS = "before, after and on_error are lists of commands in quotes, timeout whole seconds > 0"


def check_setting_type(path: Path, key: str, value: object) -> None:
    outer, inner, words, _ = SETTING_TYPES[key]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if type(value) is not outer or (inner is not None and any(type(v) is not inner for v in items)):
        raise QtbError(f"{path}: {key} must be {words}", EXIT_CONFIG)


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file atomically, created with `mode` from the start (no window with wider access,
    whatever the umask); a failed one leaves no temporary file and names the file (ENOSPC does not)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        raise QtbError(f"cannot write {path}: {e.strerror or e}", EXIT_FAILED) from None
    finally:
        with contextlib.suppress(OSError):  # a read-only disk refuses even this unlink
            tmp.unlink(missing_ok=True)


def generate_secret() -> str:
    return secrets.token_hex(32)  # 256 bits


def load_secret() -> str:
    path = secret_path()
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read(200).decode("ascii", "replace").strip()
    except PermissionError:
        raise QtbError(f"cannot read {path}: run as the user that ran `qtb-pipe init`", EXIT_CONFIG) from None
    except OSError as e:  # missing, a directory in its place, a disk error
        hint = "`qtb-pipe init` makes one; after a reinstall `init --recovery-key KEY` puts it back"
        raise QtbError(f"no backup secret at {path} ({e.strerror}): {hint}", EXIT_CONFIG) from None
    if mode & 0o077:
        raise QtbError(
            f"{path} is readable by others (mode {stat.S_IMODE(mode):04o}): fix it with chmod 600 {path}",
            EXIT_CONFIG,
        )
    if not SECRET_RE.fullmatch(text):
        raise QtbError(f"{path} does not hold a qtb-pipe secret (64 hex digits)", EXIT_CONFIG)
    return text


def key_check(secret: str) -> str:
    """The recovery key's ninth group: 8 hex digits a mistyped key does not match."""
    return hashlib.sha256(b"qtb-pipe recovery key\0" + bytes.fromhex(secret)).hexdigest()[:8]


def parse_recovery_key(text: str) -> str:
    """The recovery key as shown by `init`: 64 hex digits and the check group, grouped with dashes or
    spaces for reading (a key of 0.1, without the check group, is taken as it is)."""
    compact = re.sub(r"[\s-]", "", text.strip().lower())
    secret, check = compact[:64], compact[64:]
    if not SECRET_RE.fullmatch(secret) or len(check) not in (0, 8):
        raise QtbError("a recovery key is 9 groups of 8 hex digits (dashes, spaces ignored)", EXIT_USAGE)
    if check and check != key_check(secret):
        raise QtbError("the recovery key's last group does not fit the rest: a digit is mistyped", EXIT_USAGE)
    return secret


def format_recovery_key(secret: str) -> str:
    keyed = secret + key_check(secret)
    return "-".join(keyed[i : i + 8] for i in range(0, 72, 8))
