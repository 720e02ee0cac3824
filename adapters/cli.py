"""qtb-adapter: the backup qube's end of qtb-pipe (subcommands and exit codes in docs/adapters.md).

qubes.Backup / qubes.Restore run `qtb-adapter store --run X` and `qtb-adapter dump ID` as plain
argv (no shell pipes), so everything is found from $HOME: ~/.config/qtb-pipe/adapter.toml.
Errors are one line on stderr and a documented exit code; `--json` gives machine output.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import humanize

from . import __version__
from .base import engine_names
from .commands import (
    Session,
    cmd_check,
    cmd_commit,
    cmd_drop_pending,
    cmd_dump,
    cmd_init,
    cmd_list,
    cmd_manifest,
    cmd_pending,
    cmd_prune,
    cmd_recovery_info,
    cmd_store,
    cmd_version,
    parse_duration,
)
from .config import KEEP_KEYS, load_config
from .errors import AdapterError, NoSpaceError, UsageError
from .monitoring import MAX_BODY_BYTES, PING_SUFFIX, ping
from .retention import KeepPolicy


class Terminated(BaseException):
    """SIGTERM/SIGHUP: unwind (killing the engine before it sees end-of-file), then exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def keep_count(text: str) -> int:
    """A keep-* value: a whole number >= 0 (restic and borg read -1 as "keep all"; we refuse it)."""
    if not re.fullmatch(r"[0-9]{1,6}", text):
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {text!r}")
    return int(text)


def _size(value: int | None) -> str:
    return "-" if value is None else humanize.naturalsize(value, binary=True)


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--config", type=Path, help="config file (default ~/.config/qtb-pipe/adapter.toml)")
    common.add_argument("--engine", help="which configured repository (default: the config's `engine`)")

    parser = Parser(
        prog="qtb-adapter", description="qtb-pipe adapter: Qubes v4 backup streams into restic or borg"
    )
    parser.add_argument("--version", action="version", version=f"qtb-adapter {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("init", parents=[common], help="create or adopt a repository (and write the config)")
    p.add_argument("--repo", help="repository location, as the engine spells it")
    p.add_argument("--password-file", help="file holding the engine password")
    p.add_argument("--password-command", help="command printing the engine password")
    p.add_argument("--generate-password", action="store_true", help="create a random password file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="engine setting for the [engine] table (e.g. store_method=create)",
    )

    p = sub.add_parser("store", parents=[common], help="stream on stdin -> pending snapshot")
    p.add_argument("--run", required=True)

    p = sub.add_parser("pending", parents=[common], help="a pending run's member list (or all pending)")
    p.add_argument("--run")

    p = sub.add_parser("commit", parents=[common], help="sealed manifest on stdin -> complete snapshot")
    p.add_argument("--run", required=True)

    p = sub.add_parser("manifest", parents=[common], help="the sealed manifest of a snapshot, as committed")
    p.add_argument("snapshot")

    p = sub.add_parser("dump", parents=[common], help="the stream of a complete snapshot on stdout")
    p.add_argument("snapshot")

    p = sub.add_parser("list", parents=[common], help="complete snapshots (with --pending also pending ones)")
    p.add_argument("--pending", action="store_true", help="also list pending (not restorable) snapshots")

    p = sub.add_parser("prune", parents=[common], help="apply a keep policy to complete snapshots")
    for key in KEEP_KEYS:
        p.add_argument("--" + key.replace("_", "-"), type=keep_count, dest=key, metavar="N")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument(
        "--protect",
        metavar="QUBE,QUBE…",
        help="qubes whose newest copy is kept whatever the rules say (default: every qube; "
        "dom0 passes the qubes that still exist)",
    )
    p.add_argument(
        "--recorded",
        metavar="FILE",
        help="snapshot ids, one a line ('-': stdin), that dom0 holds a record of: only those count as "
        "a protected qube's copies (default: every snapshot; dom0 passes its records)",
    )

    p = sub.add_parser("check", parents=[common], help="the engine's integrity check")
    p.add_argument("--read-data", action="store_true", help="read and verify all data")
    p.add_argument(
        "--read-data-subset",
        "--subset",
        dest="subset",
        help="verify a data subset: restic 1/5, 10%%, 500M; borg last=N (other specs: all data)",
    )

    sub.add_parser(
        "recovery-info",
        parents=[common],
        help="what a new system needs to open the repository: location, engine password, borg's key",
    )
    sub.add_parser(
        "version",
        parents=[common],
        help="this adapter's version and its engine's (the engine is found and checked, no repository "
        "is opened)",
    )
    p = sub.add_parser(
        "ping",
        parents=[common],
        help="tell [monitoring] ping_url how a run goes (healthchecks.io style); never fails",
        description="POSTs to ping_url (success), ping_url/start or ping_url/fail, with the message on "
        "stdin (at most 10 kB) as the body; a server that cannot be reached within [monitoring] timeout "
        "seconds is a warning and exit 0, so that monitoring never fails a backup.",
    )
    p.add_argument("state", choices=list(PING_SUFFIX))
    p = sub.add_parser("drop-pending", parents=[common], help="remove stale pending snapshots")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--run", help="drop this run's pending snapshot(s)")
    group.add_argument("--older-than", default=None, help="age like 12h, 2d (default 24h)")
    group.add_argument("--all", action="store_true", help="drop every pending snapshot")
    return parser


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(data, sort_keys=True))
        return
    if text:
        print(text)
    for warning in data.get("warnings") or []:
        print(f"qtb-adapter: warning: {warning}", file=sys.stderr)


def _list_text(data: dict[str, Any]) -> str:
    rows = [("ID", "STATE", "TIME", "BACKUP ID", "STREAM", "ADDED", "QUBES")]
    for s in data["snapshots"]:
        rows.append((
            s["id"], s["state"], s["time"], s["backup_id"] or "-", _size(s["stream_bytes"]),
            _size(s["added_bytes"]), ",".join(s["qubes"] or []) or "-",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1] for r in rows]
    return "\n".join(lines) if data["snapshots"] else "no snapshots"


def _keep_policy(args: argparse.Namespace, defaults: dict[str, int]) -> KeepPolicy:
    given = {key: getattr(args, key) for key in KEEP_KEYS if getattr(args, key) is not None}
    values = given or defaults
    return KeepPolicy(**{key.removeprefix("keep_"): int(value) for key, value in values.items()})


def _read_lines(source: str) -> list[str]:
    """Non-empty lines of a file, or of stdin for '-'."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {source}: {e}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _settings(pairs: list[str]) -> dict[str, str | int | bool]:
    """--set KEY=VALUE pairs, typed as TOML would type them: true/false, integers, else text."""
    settings: dict[str, str | int | bool] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not re.fullmatch(r"[a-z_]+", key):
            raise UsageError(f"--set wants KEY=VALUE with a lower-case key: {pair!r}")
        if value in ("true", "false"):
            settings[key] = value == "true"
        elif re.fullmatch(r"-?\d+", value):
            settings[key] = int(value)
        else:
            settings[key] = value
    return settings


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "init":
        data = cmd_init(
            args.config,
            engine=args.engine,
            repo=args.repo,
            password_file=args.password_file,
            password_command=args.password_command,
            generate_password=args.generate_password,
            settings=_settings(args.set),
        )
        verb = "created" if data["created"] else "adopted existing"
        _emit(args, data, f"{verb} {data['engine']} {data['version']} repository {data['repository']}")
        return 0
    if args.command == "ping":  # needs the config, not the engine
        monitoring = load_config(args.config, args.engine, engine_names()).monitoring
        body = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read(MAX_BODY_BYTES)
        data = ping(monitoring, args.state, body)
        _emit(args, data, f"ping {args.state} sent to {data['server']}" if data["sent"] else "")
        return 0
    session = Session(args.config, args.engine)
    if args.command == "store":
        data = cmd_store(session, args.run, sys.stdin.fileno())
        _emit(
            args,
            data,
            f"stored pending snapshot {data['id']}: {data['members']} members, "
            f"{_size(data['stream_bytes'])}, {_size(data['added_bytes'])} added",
        )
    elif args.command == "pending":
        data = cmd_pending(session, args.run)
        if "members" in data and isinstance(data["members"], list):
            text = "\n".join(f"{m['size']:>14}  {m['name']}" for m in data["members"])
        else:
            text = (
                "\n".join(f"{p['run']}  {p['id']}  {p['time']}" for p in data["pending"]) or "nothing pending"
            )
        _emit(args, data, text)
    elif args.command == "commit":
        data = cmd_commit(session, args.run, sys.stdin.buffer)
        _emit(args, data, f"committed {data['id']} (backup {data['backup_id']})")
    elif args.command == "manifest":
        sys.stdout.buffer.write(cmd_manifest(session, args.snapshot))  # already JSON; --json changes nothing
        sys.stdout.buffer.flush()
    elif args.command == "dump":
        sys.stdout.flush()
        cmd_dump(session, args.snapshot, sys.stdout.fileno())  # the stream is the output, --json or not
    elif args.command == "list":
        data = cmd_list(session, args.pending)
        _emit(args, data, _list_text(data))
    elif args.command == "prune":
        protected = None if args.protect is None else {q for q in args.protect.split(",") if q}
        recorded = None if args.recorded is None else set(_read_lines(args.recorded))
        data = cmd_prune(session, _keep_policy(args, session.config.keep), args.dry_run, protected, recorded)
        _emit(
            args,
            data,
            f"keep {len(data['keep'])}, remove {len(data['remove'])}"
            + (" (dry run)" if data["dry_run"] else ""),
        )
    elif args.command == "check":
        data, ok = cmd_check(session, args.read_data, args.subset)
        _emit(args, data, data["output"])
        if not ok:
            last = data["output"].splitlines()[-1] if data["output"] else "no details"
            raise AdapterError(f"repository check failed: {last}")
    elif args.command == "recovery-info":
        data = cmd_recovery_info(session)
        key = f"\nborg key (borg key import --paper):\n{data['key_export']}" if data["key_export"] else ""
        _emit(
            args, data, f"{data['engine']} repository {data['repository']}\npassword: {data['password']}{key}"
        )
    elif args.command == "version":
        data = cmd_version(session)
        _emit(args, data, f"qtb-adapter {data['adapter']}, {data['engine']} {data['engine_version']}")
    elif args.command == "drop-pending":
        older = parse_duration(args.older_than) if args.older_than else None
        data = cmd_drop_pending(session, args.run, older, args.all)
        _emit(args, data, f"dropped {len(data['dropped'])} pending, {len(data['orphans_removed'])} orphans")
    return 0


def _on_signal(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def _fail(message: str, code: int) -> int:
    # The exit code is in the line too: qubesd passes only a service's stderr on to dom0 (docs/adapters.md).
    print(f"qtb-adapter: error (exit {code}): {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    try:
        return dispatch(build_parser().parse_args(argv))
    except AdapterError as exc:
        return _fail(exc.message, int(exc.exit_code))
    except BrokenPipeError:
        return 0  # our reader went away: nothing left to say to it
    except OSError as exc:
        error: AdapterError = NoSpaceError(str(exc)) if exc.errno == errno.ENOSPC else AdapterError(str(exc))
        return _fail(error.message, int(error.exit_code))
    except KeyboardInterrupt:
        return _fail("interrupted", 128 + signal.SIGINT)
    except Terminated as exc:
        return _fail(f"terminated by signal {exc.signum}", 128 + exc.signum)


if __name__ == "__main__":
    sys.exit(main())
