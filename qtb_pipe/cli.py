"""`qtb-pipe`, the dom0 driver: deduplicated Qubes backups through restic or borg, restored with the
stock qvm-backup-restore. Standard library only (dom0 has no pip)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from . import shim_install
from .config import ENGINES, RETENTION_KEYS, load_config, root
from .errors import EXIT_FAILED, EXIT_OK, EXIT_SHIM, QtbError
from .qubes import printable
from .ui import print_json

EPILOG = """exit codes: 0 ok, 1 operation failed, 2 bad arguments, 3 not configured (run qtb-pipe init),
4 unknown or pending snapshot, 5 data failed authentication (tampered / wrong secret / not from this
backup), 6 backup qube or its adapter not ready, 7 scrypt shim not installed or not active.
Docs: docs/commands.md, docs/security.md, docs/troubleshooting.md."""


def _config(args: argparse.Namespace):
    cfg = load_config()
    if getattr(args, "engine", None):
        cfg.engine = args.engine
    return cfg


def cmd_init(args: argparse.Namespace) -> dict:
    from .actions.setup import print_init, run_init

    result = run_init(args.backup_qube, args.engine or "restic", args.force, args.recovery_key)
    if not args.json:
        print_init(result)
    return result


def cmd_config(args: argparse.Namespace) -> dict:
    from .actions.setup import print_config_check, run_config_check

    result = run_config_check()
    if not args.json:
        print_config_check(result)
    return result


def cmd_install_shim(args: argparse.Namespace) -> dict:
    try:
        res = shim_install.install_shim(root(), args.prefix)
    except shim_install.ShimInstallError as e:
        raise QtbError(str(e), EXIT_SHIM) from None
    result = {
        "shim": str(res.shim_path),
        "real_scrypt": str(res.real_scrypt),
        "action": res.action,
        "state_dir": str(res.state_dir),
    }
    if not args.json:
        print(
            f"shim {res.action}: {res.shim_path} (hands other calls to {res.real_scrypt}, "
            f"{res.real_scrypt_version})"
        )
    return result


def cmd_uninstall_shim(args: argparse.Namespace) -> dict:
    try:
        res = shim_install.uninstall_shim(root(), args.prefix)
    except shim_install.ShimInstallError as e:
        raise QtbError(str(e), EXIT_SHIM) from None
    result = {"shim": str(res.shim_path), "removed": res.removed}
    if not args.json:
        print(f"removed {res.shim_path}" if res.removed else f"nothing of qtb-pipe at {res.shim_path}")
    return result


def cmd_shim_status(args: argparse.Namespace) -> dict:
    st = shim_install.shim_status(root(), args.prefix)
    result = {
        "shim": str(st.shim_path),
        "installed": st.installed,
        "foreign_file": st.foreign_file,
        "version": st.installed_version,
        "packaged_version": st.packaged_version,
        "real_scrypt": st.real_scrypt,
        "real_scrypt_ok": st.real_scrypt_ok,
        "qubesd_path": st.qubesd_path,
        "qubesd_path_source": st.qubesd_path_source,
        "qubesd_scrypt": str(st.qubesd_scrypt) if st.qubesd_scrypt else None,
        "active": st.qubesd_uses_shim,
        "problems": st.problems,
    }
    if not args.json:
        state = "active" if st.qubesd_uses_shim else "NOT active"
        print(
            f"shim {state}: qubesd resolves scrypt to {result['qubesd_scrypt']} "
            f"(PATH from {st.qubesd_path_source})"
        )
        for p in st.problems:
            print(f"problem: {p}")
    if not st.qubesd_uses_shim:
        raise _Exit(result, EXIT_SHIM)
    return result


def cmd_backup(args: argparse.Namespace) -> dict:
    from .actions.backup import run_backup

    return run_backup(_config(args), args.qubes, args.exclude, args.json)


def cmd_restore(args: argparse.Namespace, verify_only: bool = False) -> dict:
    from .actions.restore import print_report, run_restore

    options = [
        f"--{o}"
        for o in ("rename-conflicting", "skip-conflicting", "skip-dom0-home", "paranoid-mode")
        if getattr(args, o.replace("-", "_"), False)
    ]
    result = run_restore(
        _config(args),
        args.snapshot,
        args.qubes,
        options,
        verify_only,
        args.json,
        args.single_pass,
        args.new_system,
    )
    if not args.json:
        print_report(result)
    return result


def cmd_verify(args: argparse.Namespace) -> dict:
    from .actions.manage import run_check, run_list
    from .actions.restore import print_report, run_restore

    cfg = _config(args)
    snapshot = args.snapshot
    if snapshot is None:
        complete = [r for r in run_list(cfg) if r["state"] == "complete"]
        if not complete:
            raise QtbError("no complete snapshot to verify: run qtb-pipe backup", 4)
        snapshot = max(complete, key=lambda r: r["time"])["id"]
    result = run_restore(cfg, snapshot, [], [], True, args.json, new_system=args.new_system)
    result["engine_check"] = run_check(cfg, args.read_data_subset)["adapter"]
    if not args.json:
        print_report(result)
        print(
            f"snapshot {snapshot}: every chunk authenticated against its sealed manifest; "
            f"{cfg.engine} check passed"
        )
    return result


def cmd_list(args: argparse.Namespace) -> list:
    from .actions.manage import print_list, run_list

    rows = run_list(_config(args))
    if not args.json:
        print_list(rows)
    return rows


def cmd_prune(args: argparse.Namespace) -> dict:
    from .actions.manage import run_prune

    result = run_prune(_config(args), {k: getattr(args, k) for k in RETENTION_KEYS}, args.dry_run)
    if not args.json:
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(result['removed'])} snapshot(s), kept {len(result['kept'])}")
    return result


def cmd_check(args: argparse.Namespace) -> dict:
    from .actions.manage import run_check

    result = run_check(_config(args), args.read_data_subset)
    if not args.json:
        print(f"{result['engine']} repository check passed")
    return result


def cmd_demo(args: argparse.Namespace) -> dict:
    from .actions.demo import run_demo

    return run_demo(args.dir, args.engine, args.json, args.profile)


class _Exit(Exception):
    def __init__(self, result, code: int) -> None:
        super().__init__(code)
        self.result, self.code = result, code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qtb-pipe",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str, description: str | None = None) -> argparse.ArgumentParser:
        s = sub.add_parser(
            name,
            help=help,
            description=description or help,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        s.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        s.set_defaults(func=func)
        return s

    s = add(
        "init",
        cmd_init,
        "write the dom0 config and generate the backup secret (shown once as a recovery key)",
    )
    s.add_argument("--backup-qube", default="backup", help="the qube that runs qtb-adapter (default: backup)")
    s.add_argument("--engine", choices=ENGINES, help="default engine (default: restic)")
    s.add_argument("--force", action="store_true", help="replace an existing secret and config")
    s.add_argument("--recovery-key", help="restore the secret from a recovery key instead of generating one")

    s = add("config", cmd_config, "config check: which qubes will be backed up, which not and why, warnings")
    s.add_argument("action", choices=["check"])

    for name, func, text in (
        ("install-shim", cmd_install_shim, "install the scrypt shim next to the real scrypt"),
        ("uninstall-shim", cmd_uninstall_shim, "remove the shim, leaving things as before"),
        ("shim-status", cmd_shim_status, "is the shim installed, and would qubesd use it?"),
    ):
        s = add(name, func, text)
        s.add_argument(
            "--prefix",
            default=shim_install.DEFAULT_PREFIX,
            help="install prefix (default: /usr/local, before /usr on qubesd's PATH)",
        )

    s = add(
        "backup",
        cmd_backup,
        "back up qubes into the repository in the backup qube",
        "Runs the stock qvm-backup (uncompressed, through the shim) into `qtb-adapter store` in the backup "
        "qube, cross-checks what was stored against what dom0 sent, then seals and commits the manifest. "
        "Without QUBE arguments: the config's include list, or every qube with include_in_backups.",
    )
    s.add_argument("qubes", nargs="*", metavar="QUBE")
    s.add_argument("-x", "--exclude", action="append", default=[], metavar="QUBE")
    s.add_argument("--engine", choices=ENGINES, help="override the configured engine")

    for name, func, text in (
        ("restore", cmd_restore, "restore a snapshot with the stock qvm-backup-restore"),
    ):
        s = add(name, func, text)
        s.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id, see qtb-pipe list")
        s.add_argument("qubes", nargs="*", metavar="QUBE", help="restore only these (default: all)")
        s.add_argument("--engine", choices=ENGINES)
        group = s.add_mutually_exclusive_group()
        group.add_argument(
            "--rename-conflicting", action="store_true", help="restore as NAME1 if NAME exists"
        )
        group.add_argument("--skip-conflicting", action="store_true", help="skip qubes whose name exists")
        s.add_argument("--skip-dom0-home", action="store_true")
        s.add_argument(
            "--paranoid-mode",
            action="store_true",
            help="passed to qvm-backup-restore; needs the shim in the management DispVM's template",
        )
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
        "verify", cmd_verify, "test-restore a snapshot (--verify-only through the whole pipe) + engine check"
    )
    s.add_argument("snapshot", nargs="?", metavar="SNAPSHOT", help="default: the latest")
    s.add_argument("--latest", action="store_true", help="the latest complete snapshot (the default)")
    s.add_argument("--engine", choices=ENGINES)
    s.add_argument("--read-data-subset", metavar="N%|n/t", help="also read this part of the repository data")
    s.add_argument("--new-system", action="store_true", help="as for restore: no dom0 record of the snapshot")

    s = add("list", cmd_list, "snapshots with date, state, sizes, and whether dom0 has a record of them")
    s.add_argument("--engine", choices=ENGINES)

    s = add("prune", cmd_prune, "forget old complete snapshots by retention, then the engine's cleanup")
    s.add_argument("--engine", choices=ENGINES)
    for key in RETENTION_KEYS:
        s.add_argument(f"--{key.replace('_', '-')}", type=int, metavar="N", dest=key)
    s.add_argument("--dry-run", action="store_true")

    s = add("check", cmd_check, "the engine's integrity check of the repository")
    s.add_argument("--engine", choices=ENGINES)
    s.add_argument("--read-data-subset", metavar="N%|n/t")

    s = add("demo", cmd_demo, "the whole thing on an emulated Qubes (qubes-sim), no Qubes needed")
    s.add_argument("--dir", help="work directory (default: a new temporary one, removed afterwards)")
    s.add_argument("--engine", choices=[*ENGINES, "both"], default="both")
    s.add_argument("--profile", choices=["small", "demo"], default="demo", help="world size (default: demo)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "restore" and args.verify_only:
        handler = lambda a: cmd_restore(a, verify_only=True)  # noqa: E731
    else:
        handler = args.func
    try:
        result = handler(args)
        code = EXIT_OK
    except _Exit as e:
        result, code = e.result, e.code
    except QtbError as e:
        print(f"qtb-pipe: error: {printable(str(e), 1000)}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("qtb-pipe: interrupted; nothing was committed", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback for the user; QTB_PIPE_DEBUG=1 shows it
        if os.environ.get("QTB_PIPE_DEBUG"):
            traceback.print_exc()
        print(
            f"qtb-pipe: internal error: {type(e).__name__}: {e} (QTB_PIPE_DEBUG=1 shows details)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if args.json:
        print_json(result)
    return code


if __name__ == "__main__":
    sys.exit(main())
