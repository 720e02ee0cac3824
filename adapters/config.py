"""The backup qube's own settings: ~/.config/qtb-pipe/adapter.toml.

One table per engine, each with its repository and password source, so that one backup qube can
serve a restic and a borg repository side by side; every subcommand picks one with `--engine`
(the driver always says which), else the top-level `engine`, else the only one configured.
Engine passwords are named here (a file or a command), never given on a command line that dom0
composes: qubes.Backup runs `qtb-adapter store --run X --engine E` as plain argv, with the config
found from $HOME.
"""

from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RepositoryMissingError, UsageError
from .monitoring import DEFAULT_TIMEOUT_SECONDS, PING_URL_RE, Monitoring

CONFIG_RELATIVE_PATH = Path(".config/qtb-pipe/adapter.toml")
KEEP_KEYS = ("keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
GLOBAL_KEYS = {"engine", "state_dir", "lock_wait"}
ENGINE_COMMON_KEYS = ("repository", "password_file", "password_command")
DEFAULT_LOCK_WAIT_SECONDS = 5

TomlValue = str | int | bool | list[str]


def home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def default_config_path() -> Path:
    return home() / CONFIG_RELATIVE_PATH


def default_state_dir() -> Path:
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home() / ".local/state"
    return base / "qtb-pipe"


@dataclass(frozen=True)
class PasswordSource:
    """Where the engine password comes from; exactly one of the two is set."""

    file: Path | None = None
    command: str | None = None


@dataclass
class AdapterConfig:
    """The settings of one engine's repository, as a subcommand sees them."""

    path: Path
    engine: str
    repository: str
    password: PasswordSource
    state_dir: Path = field(default_factory=default_state_dir)
    lock_wait: int = DEFAULT_LOCK_WAIT_SECONDS
    engine_settings: dict[str, Any] = field(default_factory=dict)  # the rest of the [engine] table
    keep: dict[str, int] = field(default_factory=dict)  # default prune policy ([retention] table)
    monitoring: Monitoring = field(default_factory=Monitoring)  # the [monitoring] table


def _expand(path: str) -> Path:
    return Path(path.replace("~", str(home()), 1) if path.startswith("~") else path)


def read_raw(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RepositoryMissingError(f"no configuration at {path}: run `qtb-adapter init` first") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RepositoryMissingError(f"cannot read configuration {path}: {exc}") from None


# The default keep policy: `[retention]`, as dom0's config calls it; `[prune]` is its old name.
RETENTION_TABLES = ("retention", "prune")
MONITORING_TABLE = "monitoring"  # ping_url, timeout (adapters/monitoring.py)


def engine_tables(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        k: v for k, v in raw.items() if isinstance(v, dict) and k not in (*RETENTION_TABLES, MONITORING_TABLE)
    }


def read_monitoring(path: Path, raw: dict[str, Any]) -> Monitoring:
    table = raw.get(MONITORING_TABLE, {})
    if not isinstance(table, dict) or set(table) - {"ping_url", "timeout"}:
        raise RepositoryMissingError(f"{path}: [{MONITORING_TABLE}] may only hold ping_url and timeout")
    url, timeout = table.get("ping_url"), table.get("timeout", DEFAULT_TIMEOUT_SECONDS)
    if url is not None and not (isinstance(url, str) and PING_URL_RE.fullmatch(url)):
        raise RepositoryMissingError(
            f"{path}: [{MONITORING_TABLE}] ping_url must be an http:// or https:// URL"
        )
    if type(timeout) is not int or not 1 <= timeout <= 120:
        raise RepositoryMissingError(f"{path}: [{MONITORING_TABLE}] timeout must be 1 to 120 seconds")
    return Monitoring(url, timeout)


def load_config(path: Path | None, engine: str | None, known_engines: list[str]) -> AdapterConfig:
    path = path or default_config_path()
    raw = read_raw(path)
    tables = engine_tables(raw)
    known = {*GLOBAL_KEYS, *RETENTION_TABLES, MONITORING_TABLE, *known_engines}
    unknown = {k for k in raw if k not in known}
    if unknown:
        raise RepositoryMissingError(f"{path}: unknown setting(s) or engine(s): {', '.join(sorted(unknown))}")
    if engine is None:
        engine = raw.get("engine") if isinstance(raw.get("engine"), str) else None
        if engine is None and len(tables) == 1:
            engine = next(iter(tables))
        if engine is None:
            raise RepositoryMissingError(f"{path}: several engines configured; say which with --engine")
    table = tables.get(engine)
    if table is None or not table.get("repository"):
        raise RepositoryMissingError(
            f"no {engine} repository configured in {path}: "
            f"run `qtb-adapter init --engine {engine} --repo ...`"
        )
    repository = table["repository"]
    password_file, password_command = table.get("password_file"), table.get("password_command")
    if not isinstance(repository, str) or bool(password_file) == bool(password_command):
        raise RepositoryMissingError(
            f"{path}: [{engine}] needs `repository` and exactly one of `password_file`, `password_command`"
        )
    password = PasswordSource(
        file=_expand(password_file) if isinstance(password_file, str) and password_file else None,
        command=password_command if isinstance(password_command, str) and password_command else None,
    )
    state_dir = raw.get("state_dir")
    lock_wait = raw.get("lock_wait", DEFAULT_LOCK_WAIT_SECONDS)
    if not isinstance(lock_wait, int) or isinstance(lock_wait, bool) or lock_wait < 0:
        raise RepositoryMissingError(f"{path}: `lock_wait` must be a number of seconds")
    if "prune" in raw:
        if "retention" in raw:
            raise RepositoryMissingError(f"{path}: both [retention] and [prune] (its old name): keep one")
        print(f"qtb-adapter: warning: {path}: [prune] is now called [retention]", file=sys.stderr)
    table_name = "prune" if "prune" in raw else "retention"
    keep = raw.get(table_name, {})
    if not isinstance(keep, dict) or set(keep) - set(KEEP_KEYS):
        raise RepositoryMissingError(f"{path}: [{table_name}] may only hold {', '.join(KEEP_KEYS)}")
    for key, value in keep.items():
        if type(value) is not int or value < 0:  # -1 is "keep all" to restic/borg users: refuse it
            raise RepositoryMissingError(f"{path}: [{table_name}] {key} must be a whole number >= 0")
    return AdapterConfig(
        path=path,
        engine=engine,
        repository=repository,
        password=password,
        state_dir=_expand(state_dir) if isinstance(state_dir, str) else default_state_dir(),
        lock_wait=lock_wait,
        engine_settings={k: v for k, v in table.items() if k not in ENGINE_COMMON_KEYS},
        keep={k: int(v) for k, v in keep.items()},
        monitoring=read_monitoring(path, raw),
    )


def toml_string(text: str) -> str:
    """A TOML basic string (tomllib can read but not write)."""
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_string(str(v)) for v in value) + "]"
    return toml_string(value)


def render_config(raw: dict[str, Any]) -> str:
    """Our config's shape only: top-level values, then one level of tables."""
    lines = ["# qtb-adapter settings for this backup qube. Engine secrets stay in this qube.", ""]
    for key, value in raw.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {toml_value(value)}")
    for key, table in raw.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]"]
            for inner, value in table.items():
                if isinstance(value, dict):
                    raise UsageError(f"nested table [{key}.{inner}] is not supported in the config")
                lines.append(f"{inner} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def write_engine_config(
    path: Path,
    *,
    engine: str,
    repository: str,
    password: PasswordSource,
    engine_settings: dict[str, TomlValue] | None = None,
) -> None:
    """Add or replace one engine's table, keeping the other engines and global settings."""
    raw = read_raw(path) if path.exists() else {}
    table: dict[str, Any] = {"repository": repository}
    if password.file is not None:
        table["password_file"] = str(password.file)
    elif password.command is not None:
        table["password_command"] = password.command
    else:
        raise UsageError("init needs --password-file, --password-command or --generate-password")
    old = raw.get(engine) if isinstance(raw.get(engine), dict) else {}
    table.update({k: v for k, v in old.items() if k not in ENGINE_COMMON_KEYS})
    table.update(engine_settings or {})
    raw[engine] = table
    raw.setdefault("engine", engine)  # the first engine configured is the default
    ordered = {k: raw[k] for k in raw if not isinstance(raw[k], dict)}
    ordered.update({k: raw[k] for k in raw if isinstance(raw[k], dict)})
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".toml.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(render_config(ordered))
    os.replace(tmp, path)
