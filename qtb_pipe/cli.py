"""`qtb-pipe`, the dom0 driver: deduplicated Qubes backups through restic or borg, restored with the
stock qvm-backup-restore. Standard library only (dom0 has no pip)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import sys
import traceback
from typing import NoReturn

from scrypt_shim.shim import SHIM_VERSION

from . import __version__, errors, proc, qubes, ui
from .actions import manage, setup
from .actions.backup import refuse_unknown, run_backup
from .actions.restore import RestoreOptions, print_report, run_restore, run_restore_latest
from .adapter import Adapter, check_snapshot_id
from .config import ENGINES, RETENTION_KEYS, load_config, root
from .errors import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_SHIM, EXIT_USAGE, HINTS, PartialFailure, QtbError
from .qubes import RestoreFlags
from .runs import cleanup_stale_runs
from .shim_install import DEFAULT_PREFIX, install_shim, shim_status, uninstall_shim
from .ui import print_json

EPILOG = """exit codes: 0 ok, 1 operation failed, 2 bad arguments, 3 not configured (run qtb-pipe init),
4 unknown or pending snapshot, 5 data failed authentication (tampered / wrong secret / not from this
backup), 6 backup qube or its adapter not ready, 7 scrypt shim not installed or not active,
130 interrupted (Ctrl-C).
With --json an error is also one JSON object on stdout: {"error", "exit_code", "hint"} (a partial
failure: the result so far, with those three keys added).
Docs: docs/commands.md, docs/security.md, docs/troubleshooting.md."""
# qvm-backup-restore options passed through as they are (qubes.RestoreFlags), with their help
RESTORE_FLAGS = {
    "rename_conflicting": "restore as NAME-1 if NAME exists (as qvm-backup-restore names them)",
    "skip_conflicting": "skip qubes whose name exists",
    "skip_broken": "skip qubes whose template or net qube is missing",
    "ignore_missing": "restore qubes whose template or net qube is missing with the system's default",
    "skip_dom0_home": "do not restore dom0's home",
    "ignore_username_mismatch": "restore dom0's home although the user name differs",
    "paranoid_mode": "passed to qvm-backup-restore; needs the shim in the management DispVM's template",
}


def _config(args: argparse.Namespace):
    cfg = load_config()
    if getattr(args, "engine", None):
        cfg.engine = args.engine
    return cfg


def cmd_config(args: argparse.Namespace) -> dict:
    result = setup.run_config_check()
    if result["errors"]:  # backup would refuse: not exit 0
        raise PartialFailure(f"{len(result['errors'])} error(s) in the configuration", EXIT_CONFIG, result)
    return result


def print_installed(r: dict) -> None:
    print(f"shim {r['action']}: {r['shim']} (other calls: {r['real_scrypt_version']}, {r['real_scrypt']})")


def print_uninstalled(r: dict) -> None:
    print(f"removed {r['shim']}" if r["removed"] else f"nothing of qtb-pipe at {r['shim']}")


def cmd_shim_status(dom0_root, prefix: str) -> dict:
    st = shim_status(dom0_root, prefix)
    if not st["active"]:
        raise PartialFailure(f"the scrypt shim is not active at {st['shim']}", EXIT_SHIM, st)
    return st


def print_shim_status(st: dict) -> None:
    state = "active" if st["active"] else "NOT active"
    print(f"shim {state}: qubesd resolves scrypt to {st['qubesd_scrypt']}", end="")
    print(f" (PATH from {st['qubesd_path_source']})")
    for problem in st["problems"]:
        print(f"problem: {problem}")


def cmd_version(args: argparse.Namespace) -> dict:
    """qtb-pipe's and the shim's versions, the shim's status and, asked in the backup qube, the
    adapter's and its engine's versions (what was found stays in the answer when that fails)."""
    status = shim_status(root())
    result = {"qtb_pipe": __version__, "shim_version": SHIM_VERSION, "shim": status, "adapter": None}
    try:
        cfg = _config(args)
        result["adapter"] = Adapter(cfg.backup_qube, cfg.engine, cfg.adapter_command).version()
    except QtbError as e:
        raise PartialFailure(str(e), e.code, result) from None
    return result


def print_version(result: dict) -> None:
    print(f"qtb-pipe {result['qtb_pipe']}, scrypt shim {result['shim_version']}")
    print_shim_status(result["shim"])
    if found := result["adapter"]:
        print(f"backup qube '{found['qube']}': qtb-adapter {found['adapter_version']}, {found['engine']} "
              f"{found['engine_version']} ({found['engine_line']})")  # fmt: skip


def _restore(args: argparse.Namespace, verify_only: bool) -> dict:
    """A snapshot, or (--all, --qube, verify without one) each chosen qube's newest copy."""
    flags = RestoreFlags(verify_only=verify_only, **{k: getattr(args, k, False) for k in RESTORE_FLAGS})
    single_pass = getattr(args, "single_pass", False)
    opts = RestoreOptions(args.snapshot, args.qubes, flags, single_pass, args.new_system, args.json)
    if args.snapshot is not None:
        return run_restore(_config(args), opts)
    return run_restore_latest(_config(args), opts, args.qube or [], _as_of(getattr(args, "as_of", None)))


def _as_of(text: str | None) -> str | None:
    """--as-of TIME (ISO 8601, local time unless it says otherwise) as the records' UTC form."""
    if text is None:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise QtbError(
            f"--as-of wants a time like 2026-11-30 or 2026-11-30T18:00, not {text!r}", EXIT_USAGE
        ) from None
    if len(text) == 10:  # a day: up to its end
        moment += datetime.timedelta(days=1, seconds=-1)
    return moment.astimezone(datetime.UTC).isoformat(timespec="seconds")


def cmd_restore(args: argparse.Namespace) -> dict:
    if args.snapshot == "latest":  # restic's newest snapshot; here each (named) qube's newest copy
        args.snapshot, args.qube, args.qubes = None, (args.qube or []) + args.qubes, []
        args.all = args.all or not args.qube
    if args.all and args.qube:
        raise QtbError("--all or --qube NAME, not both", EXIT_USAGE)
    if (args.snapshot is None) == (not (args.all or args.qube)):
        raise QtbError("say what to restore: SNAPSHOT [QUBE...], --all, or --qube NAME", EXIT_USAGE)
    if args.snapshot is None and args.qubes:
        raise QtbError("with --all or --qube, name qubes with --qube", EXIT_USAGE)
    return _restore(args, args.verify_only)


def cmd_verify(args: argparse.Namespace) -> dict:
    args.snapshot, args.qubes, args.qube = None if args.snapshot == "latest" else args.snapshot, [], None
    result = _restore(args, True)
    result["check"] = manage.run_check(_config(args), args.read_data_subset)  # as `check --json` says it
    return result


def print_verify(result: dict) -> None:
    print_report(result)
    n = len(result["qubes"])
    scope = f"snapshot {result['snapshot']}" if result.get("snapshot") else f"the newest copy of {n} qube(s)"
    print(f"{scope}: every chunk authenticated against its sealed manifest; the engine check passed")
    for warning in result["check"]["warnings"]:
        ui.warn(warning)


def print_check(result: dict) -> None:
    print(f"{result['engine']} repository check passed")
    for warning in result["warnings"]:
        ui.warn(warning)


class Parser(argparse.ArgumentParser):
    """Argument errors in one line, exit 2 (argparse would print the whole usage first)."""

    def error(self, message: str) -> NoReturn:  # before the arguments are parsed, the words are enough
        ui.FORCED = "--progress" in sys.argv[1:]
        sys.exit(fail(f"{message} (see {self.prog} --help)", EXIT_USAGE, "--json" in sys.argv[1:]))


def keep_count(text: str) -> int:
    """A keep-* value: a whole number >= 0 (restic and borg read -1 as "keep all"; refused here)."""
    if not text.isdigit() or len(text) > 6:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {text!r}")
    return int(text)


def data_subset(text: str) -> str:
    """restic's `N%` (0 < N <= 100), `n/t` (1 <= n <= t), a size like `500M`; borg's `last=N`."""
    percent = re.fullmatch(r"([0-9]{1,3}(?:\.[0-9]{1,3})?)%", text)
    part = re.fullmatch(r"([0-9]{1,6})/([0-9]{1,6})", text)
    counted = (percent and 0 < float(percent[1]) <= 100) or (part and 1 <= int(part[1]) <= int(part[2]))
    if counted or re.fullmatch(r"[0-9]{1,9}[KMGT]|last=[0-9]{1,6}", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not N% (at most 100), n/t, a size like 500M or last=N")


RAW = argparse.RawDescriptionHelpFormatter  # the epilog's lines stay as written


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="qtb-pipe", description=__doc__, epilog=EPILOG, formatter_class=RAW)
    p.add_argument("--version", action="version", version=f"qtb-pipe {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    def add(
        name: str, func, help: str, description: str | None = None, show=None, engine: bool = True
    ) -> argparse.ArgumentParser:
        """A command: `func(args)` returns its result, `show(result)` prints it without --json."""
        s = sub.add_parser(
            name, help=help, description=description or help, epilog=EPILOG, formatter_class=RAW
        )
        s.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        s.add_argument("-v", "--verbose", action="store_true", help="show every command line qtb-pipe runs")
        s.add_argument("-q", "--quiet", action="store_true", help="no progress, no notes (warnings stay)")
        if engine:
            s.add_argument("--engine", choices=ENGINES, help="instead of the config's engine")
        if name in ("backup", "restore", "verify"):
            s.add_argument("--progress", action="store_true", help="also off a terminal (--json: JSON lines)")
        s.set_defaults(func=func, show=show)
        return s

    s = add(
        "init",
        lambda a: setup.run_init(a.backup_qube, a.engine, a.force, a.recovery_key),
        "write the dom0 config and generate the backup secret (shown once as a recovery key)",
        show=setup.print_init,
        engine=False,
    )
    s.add_argument("--backup-qube", help="qube running qtb-adapter (default: backup; kept without --force)")
    s.add_argument("--engine", choices=ENGINES, help="default engine (default: restic; kept without --force)")
    s.add_argument("--force", action="store_true", help="replace an existing secret and config")
    s.add_argument("--recovery-key", help="restore the secret from a recovery key instead of generating one")

    s = add(
        "config",
        cmd_config,
        "config check: which qubes will be backed up, which not and why, warnings",
        show=setup.print_config_check,
        engine=False,
    )
    s.add_argument("action", choices=["check"])

    s = add(
        "recovery-kit",
        lambda a: setup.run_recovery_kit(_config(a), a.output),
        "the recovery sheet: recovery key, repository, engine password (and borg's key), restore steps",
        "Everything a new system needs after the laptop is lost, on one printable sheet: dom0's recovery "
        "key, and from the backup qube (qtb-adapter recovery-info) the repository's location, the engine "
        "password and borg's key. Keep it offline.",
        show=setup.print_recovery_kit,
    )
    s.add_argument("-o", "--output", metavar="FILE", help="write the sheet to FILE (mode 0600), not stdout")

    add(
        "version",
        cmd_version,
        "versions: qtb-pipe, the scrypt shim (is it active?), the backup qube's adapter and engine",
        show=print_version,
    )

    shim_commands = {  # name: (function of (root, prefix), help, printer)
        "install-shim": (install_shim, "install the shim next to the real scrypt", print_installed),
        "uninstall-shim": (uninstall_shim, "remove the shim, nothing else", print_uninstalled),
        "shim-status": (cmd_shim_status, "is the shim installed and would qubesd use it?", print_shim_status),
    }
    for name, (func, text, show) in shim_commands.items():
        s = add(name, lambda a, f=func: f(root(), a.prefix), text, show=show, engine=False)
        s.add_argument("--prefix", default=DEFAULT_PREFIX, help="default: /usr/local (before /usr)")

    s = add(
        "backup",
        lambda a: run_backup(_config(a), a.qubes, a.exclude, a.json, a.full, a.dry_run),
        "back up qubes into the repository in the backup qube",
        "Runs the stock qvm-backup (uncompressed, through the shim) into `qtb-adapter store` in the backup "
        "qube, cross-checks what was stored against what dom0 sent, then seals and commits the manifest. "
        "Without QUBE arguments: the config's include list, or every qube with include_in_backups.",
    )
    s.add_argument("qubes", nargs="*", metavar="QUBE")
    s.add_argument("-x", "--exclude", action="append", default=[], metavar="QUBE")
    s.add_argument("--full", action="store_true", help="back up every selected qube, changed or not")
    s.add_argument("--dry-run", action="store_true", help="say what would be backed up, why, and how much")

    s = add(
        "restore",
        cmd_restore,
        "restore with the stock qvm-backup-restore: a snapshot, or each qube's newest copy",
        "SNAPSHOT [QUBE...] restores (some qubes of) one snapshot; --all restores the whole system from "
        "each qube's newest copy (--as-of: the newest at that time), templates and net qubes first; "
        "--qube NAME the newest copy of NAME. One stock restore per snapshot; a qube that fails is "
        "reported and the others still restore.",
        show=print_report,
    )
    s.add_argument("snapshot", nargs="?", metavar="SNAPSHOT", help="id (see list); latest: newest copies")
    s.add_argument("qubes", nargs="*", metavar="QUBE", help="restore only these of SNAPSHOT (default: all)")
    s.add_argument("--all", action="store_true", help="every qube, from its newest copy")
    s.add_argument("--qube", action="append", metavar="NAME", help="this qube's newest copy (repeatable)")
    s.add_argument("--as-of", metavar="TIME", help="with --all/--qube: the newest copies made by TIME")
    for group in (("rename_conflicting", "skip_conflicting"), ("skip_broken", "ignore_missing")):
        exclusive = s.add_mutually_exclusive_group()
        for key in group:
            exclusive.add_argument(f"--{key.replace('_', '-')}", action="store_true", help=RESTORE_FLAGS[key])
    for key in ("skip_dom0_home", "ignore_username_mismatch", "paranoid_mode"):
        s.add_argument(f"--{key.replace('_', '-')}", action="store_true", help=RESTORE_FLAGS[key])
    s.add_argument("--verify-only", action="store_true", help="check everything, restore nothing")
    s.add_argument(
        "--new-system",
        action="store_true",
        help="dom0 has no record of this snapshot (restoring after a reinstall with the recovery key): "
        "accept it on its sealed manifest alone",
    )
    s.add_argument(
        "--single-pass",
        action="store_true",
        help="skip the verify-only first pass (faster; a bad chunk then stops the restore midway, "
        "after qubes were created, but still before its data is parsed)",
    )

    s = add(
        "verify",
        cmd_verify,
        "test-restore (--verify-only, through the whole pipe) the newest copy of every qube, or one "
        "snapshot; then the engine's check",
        show=print_verify,
    )
    s.add_argument(
        "snapshot", nargs="?", metavar="SNAPSHOT", help="default, latest: every qube's newest copy"
    )
    s.add_argument(
        "--read-data-subset", metavar="N%|n/t", type=data_subset, help="also read this part of the data"
    )
    s.add_argument("--new-system", action="store_true", help="as for restore: no dom0 record of the snapshot")
    for key in ("skip_broken", "ignore_missing"):
        s.add_argument(f"--{key.replace('_', '-')}", action="store_true", help=RESTORE_FLAGS[key])

    s = add(
        "list",
        lambda a: manage.run_list(_config(a), a.qube),
        "each qube's newest copy, age and count; the snapshots and dom0's record of them",
        show=manage.print_list,
    )
    s.add_argument("--qube", metavar="NAME", help="only this qube: its history, the snapshots holding it")

    s = add(
        "prune",
        lambda a: manage.run_prune(_config(a), {k: getattr(a, k) for k in RETENTION_KEYS}, a.dry_run),
        "forget old complete snapshots by retention, then the engine's cleanup",
        show=manage.print_prune,
    )
    for key in RETENTION_KEYS:
        s.add_argument(f"--{key.replace('_', '-')}", type=keep_count, metavar="N", dest=key)
    s.add_argument("--dry-run", action="store_true")

    s = add(
        "check",
        lambda a: manage.run_check(_config(a), a.read_data_subset),
        "the engine's integrity check of the repository",
        show=print_check,
    )
    s.add_argument("--read-data-subset", metavar="N%|n/t", type=data_subset)
    return p


HOOKED = ("backup", "prune", "verify", "check")  # the scheduled jobs, and check


def run_hooked(args: argparse.Namespace) -> dict:
    """The command, inside the config's hooks (not with --dry-run): `before` failing stops it,
    `on_error` runs when it or a hook failed (its own failure is only said), `after` on success."""
    if args.command not in HOOKED or getattr(args, "dry_run", False):
        return args.func(args)
    cfg = load_config()
    if getattr(args, "snapshot", None) not in (None, "latest"):  # argument errors come before any hook
        check_snapshot_id(args.snapshot)
    if args.command == "backup" and (named := args.qubes + args.exclude):  # names dom0 does not know
        present = None
        with contextlib.suppress(QtbError):  # qvm-ls failing is the job's to say, inside the hooks
            present = qubes.list_qubes()
        if present is not None:
            refuse_unknown(named, present)
    hooks, env = cfg.hooks, {"QTB_PIPE_COMMAND": args.command}
    result = None
    try:
        run_hooks(hooks, "before", env)
        result = args.func(args)
        run_hooks(hooks, "after", env)
        return result
    except (QtbError, OSError, KeyboardInterrupt) as e:  # the failures main() reports
        interrupted = isinstance(e, KeyboardInterrupt)
        code = getattr(e, "code", errors.EXIT_INTERRUPTED if interrupted else EXIT_FAILED)
        said = proc.printable(str(e) or "interrupted", 1000)  # as fail() shows it: no byte unbounded
        run_hooks(hooks, "on_error", {**env, "QTB_PIPE_ERROR": said, "QTB_PIPE_EXIT_CODE": str(code)})
        if result is not None and isinstance(e, QtbError):  # only the after hook failed: the work is done
            raise PartialFailure(str(e), e.code, result) from None
        raise


def run_hooks(hooks: dict, stage: str, env: dict[str, str]) -> None:
    for command in hooks.get(stage, []):
        if why := proc.hook(command, env, hooks.get("timeout", 600)):
            if stage == "on_error":
                ui.warn(f"on_error hook {command!r} {why}")
                continue
            raise QtbError(f"{stage} hook {command!r} {why}", EXIT_FAILED)


def fail(message: str, code: int, as_json: bool, result: dict | None = None, prefix: str = "error") -> int:
    """One line on stderr; with --json also one object on stdout: the result so far (a partial
    failure), with `error`, `exit_code` and `hint`."""
    line = proc.printable(message, 1000).replace("\n", " ")
    print(f"qtb-pipe: {prefix}: {line}", file=sys.stderr)
    if as_json:
        print_json({**(result or {}), "error": line, "exit_code": code, "hint": HINTS.get(code, "")})
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    proc.VERBOSE, ui.QUIET, ui.FORCED = args.verbose, args.quiet, getattr(args, "progress", False)
    try:
        cleanup_stale_runs()  # a killed run's directory holds the secret in its passphrase file
        result = run_hooked(args)
    except PartialFailure as e:
        if args.show and not args.json:
            args.show(e.result)
        return fail(str(e), e.code, args.json, e.result)
    except QtbError as e:
        return fail(str(e), e.code, args.json)
    except KeyboardInterrupt:
        return fail(
            "interrupted: what had not finished is not listed as complete", errors.EXIT_INTERRUPTED, args.json
        )
    except OSError as e:  # a file dom0 must read or write: say which, and why
        where = f" {e.filename}" if e.filename else ""
        return fail(f"cannot use{where}: {e.strerror or e}", EXIT_FAILED, args.json)
    except Exception as e:  # never a traceback for the user; QTB_PIPE_DEBUG=1 shows it
        if os.environ.get("QTB_PIPE_DEBUG"):
            traceback.print_exc()
        message = f"{type(e).__name__}: {e} (QTB_PIPE_DEBUG=1 shows details)"
        return fail(message, EXIT_FAILED, args.json, prefix="internal error")
    if args.json:
        print_json(result)
    elif args.show:
        args.show(result)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
