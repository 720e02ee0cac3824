"""The emulated dom0 tools: qvm-backup, qvm-backup-restore, qvm-run, qvm-ls, qvm-prefs, qubes-prefs,
qvm-start, qvm-shutdown, qvm-check, qvm-volume, qvm-pool. Run as `python -m qubes_sim.tools TOOL
ARGS…` by the wrappers in a world's .sim/dom0-bin, with QUBES_SIM_DIR naming the world."""

from __future__ import annotations

import argparse
import getpass
import os
import subprocess
import sys
from pathlib import Path

from . import storage
from .backup import Profile, files_for, qubesd_backup, select_qubes
from .restore import BACKUP_LOG, Restore, RestoreOptions
from .world import SimError, World


def _world() -> World:
    return World.current()


def _read_passphrase(source: str | None, prompt: str, confirm: str | None) -> str:
    if source == "-":
        return sys.stdin.readline().rstrip("\n")
    if source:
        return Path(source).read_text().splitlines()[0] if Path(source).read_text() else ""
    first = getpass.getpass(prompt)
    if confirm is not None and getpass.getpass(confirm) != first:
        raise SimError("Passphrase mismatch!")
    return first


OR_PASS = "Or pass: --skip-broken or --ignore-missing."
CONFLICTING = (  # handle_broken ~l.139-153
    "Remove VMs with conflicting names from the host before proceeding.\n"
    "Or use --skip-conflicting to restore only those VMs that do not exist on the host.\n"
    "Or use --rename-conflicting to restore those VMs under modified names (with numbers at the end)."
)


def _confirm(question: str) -> bool:
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def qvm_backup(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qvm-backup", description="Create backup of Qubes")
    p.add_argument("-d", "--dest-vm", default="dom0")
    p.add_argument("-x", "--exclude", action="append", default=[])
    p.add_argument("-p", "--passphrase-file")
    p.add_argument("-Z", "--compress-filter")
    p.add_argument("--no-compress", action="store_true")
    p.add_argument("-y", "--yes", action="store_true")
    p.add_argument("--profile")
    p.add_argument("--save-profile")
    p.add_argument("backup_location", nargs="?")
    p.add_argument("vms", nargs="*")
    args = p.parse_args(argv)
    world = _world()
    profdir = world.dom0 / "etc/qubes/backup"
    if args.profile:
        path = profdir / f"{args.profile}.conf"
        if not path.is_file():
            raise SimError(f"Profile {args.profile} does not exist", 2)
        profile = Profile.parse(path.read_text())
    else:
        if not args.backup_location:
            p.error("backup location is required")
        compression: bool | str = False if args.no_compress else (args.compress_filter or True)
        passphrase = _read_passphrase(
            args.passphrase_file,
            "Please enter the passphrase that will be used to encrypt and verify the backup: ",
            "Enter again for verification: ",
        )
        profile = Profile(
            destination_vm=args.dest_vm,
            destination_path=args.backup_location,
            passphrase_text=passphrase,
            include=args.vms or None,
            exclude=args.exclude,
            compression=compression,
        )
    qubes = world.load_qubes()
    selected = select_qubes(qubes, profile.include, profile.exclude)
    for q in selected:
        size = sum(f.size for f in files_for(world, q))
        print(f"  {q.name:<24} {q.klass:<12} {size:>14}")
    print(f"The backup will be saved in {profile.destination_vm}: {profile.destination_path}")
    if not args.yes and not _confirm("Do you want to proceed?"):
        return 0  # the real client: answering no is exit 0
    # The client writes the profile, qubesd runs it (admin.backup.Execute+<profile>).
    name = args.save_profile or args.profile or f"backup-run-{os.getpid()}"
    path = profdir / f"{name}.conf"
    if not args.profile:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(profile.render())

    # As qubesadmin/tools/qvm_backup.py: progress events as `\rMaking a backup... NN.NN%` on stderr
    # (terminal or not), `\nBackup error: MSG` and exit 1 on failure, a blank line on stdout at the end.
    def progress(pct: float) -> None:
        sys.stderr.write(f"\rMaking a backup... {pct:.02f}%")
        sys.stderr.flush()

    try:
        qubesd_backup(world, Profile.parse(path.read_text()), progress)
    except SimError as e:
        print(f"\nBackup error: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.save_profile and not args.profile:
            path.unlink(missing_ok=True)
        print("\n")
    return 0


def qvm_backup_restore(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qvm-backup-restore", description="Restore Qubes VMs from backup")
    p.add_argument("-d", "--dest-vm", dest="backup_vm")
    p.add_argument("--location-is-service", action="store_true")
    p.add_argument("-p", "--passphrase-file")
    p.add_argument("--verify-only", action="store_true")
    p.add_argument("--skip-broken", action="store_true")
    p.add_argument("--ignore-missing", action="store_true")
    p.add_argument("--skip-conflicting", action="store_true")
    p.add_argument("--rename-conflicting", action="store_true")
    p.add_argument("-x", "--exclude", action="append", default=[])
    p.add_argument("--skip-dom0-home", action="store_true")
    p.add_argument("--ignore-username-mismatch", action="store_true")
    p.add_argument("--ignore-size-limit", action="store_true")
    p.add_argument("-Z", "--compression-filter")
    p.add_argument("--paranoid-mode", "--plan-b", action="store_true")
    p.add_argument("backup_location")
    p.add_argument("vms", nargs="*")
    args = p.parse_args(argv)
    if args.location_is_service:
        raise SimError("--location-is-service is not emulated", 2)
    if args.paranoid_mode:
        raise SimError("--paranoid-mode is not emulated (it needs a management DispVM)", 2)
    world = _world()
    opts = RestoreOptions(
        verify_only=args.verify_only,
        rename_conflicting=args.rename_conflicting,
        skip_conflicting=args.skip_conflicting,
        skip_broken=args.skip_broken,
        ignore_missing=args.ignore_missing,
        skip_dom0_home=args.skip_dom0_home,
        ignore_username_mismatch=args.ignore_username_mismatch,
        ignore_size_limit=args.ignore_size_limit,
        exclude=args.exclude,
        vms=args.vms,
    )
    passphrase = _read_passphrase(
        args.passphrase_file,
        "Please enter the passphrase to verify and (if encrypted) decrypt the backup: ",
        None,
    )

    def log(msg: str, logger: str = "app") -> None:
        # the tools' default verbosity enables qubesadmin/log.py's console format "%(name)s: %(message)s"
        # at INFO (qubesadmin/tools/__init__.py ~l.381, ~l.440-445); the tool logs as "app" (app.py ~l.229)
        print(f"{logger}: {msg}", file=sys.stderr)

    r = Restore(world, args.backup_vm, args.backup_location, passphrase, opts, log)
    try:
        log("Checking backup content...")
        r.load_header()
        backup_qubes = r.load_qubes_xml()
        plan = r.plan(backup_qubes)
        print("The following VMs are included in the backup:")
        for t in plan:
            note = ""
            if "already-exists" in t.problems:
                note = " <-- A VM with the same name already exists on the host!"
            elif "excluded" in t.problems:
                note = " <-- Excluded from restore"
            elif "missing-template" in t.problems:
                note = " <-- No matching template on the host or in the backup found!"
            elif "missing-netvm" in t.problems:
                note = " <-- No matching netvm on the host or in the backup found!"
            elif "username-mismatch" in t.problems:
                note = " <-- username in backup and dom0 mismatch"
            elif t.name != t.vm.name:
                note = f" <-- Will be renamed to '{t.name}'"
            print(f"  {t.vm.name:<24} {t.vm.klass:<12}{note}")
        # qubesadmin/tools/qvm_backup_restore.py handle_broken (~l.113-213), also with --verify-only
        if any("already-exists" in t.problems for t in plan):
            log("*** There are VMs with conflicting names on the host! ***")
            if not args.skip_conflicting:
                raise SimError(CONFLICTING)
            log("Those VMs will not be restored. The host VMs will NOT be overwritten.")
        if opts.verify_only:
            log("The above VM archive(s) will be verified.")
            log("Existing VMs will NOT be removed or altered.")
        else:
            log("The above VMs will be copied and added to your system.")
            log("Existing VMs will NOT be removed.")
        for problem, what in (("missing-template", "TemplateVMs"), ("missing-netvm", "NetVMs")):
            if any(problem in t.problems for t in plan):
                log(f"*** One or more {what} are missing on the host! ***")
                if not (args.skip_broken or args.ignore_missing):
                    # sic: no space after "restore." in qvm_backup_restore.py
                    raise SimError(f"Install them before proceeding with the restore.{OR_PASS}")
                if args.skip_broken:
                    log(f"Skipping broken entries: VMs that depend on missing {what} will NOT be restored.")
                else:
                    log(
                        f"Ignoring missing entries: VMs that depend on missing {what} will have default "
                        "value assigned."
                    )
        # ~l.197-213: only when dom0's home is restored, not with --verify-only (which then skips the
        # home: a qube with a problem is not good_to_go); --ignore-username-mismatch set no problem
        if any(t.vm.name == "dom0" for t in plan) and not opts.verify_only:
            if any("username-mismatch" in t.problems for t in plan):
                log("*** Dom0 username mismatch! This can break some settings! ***")
                raise SimError(
                    "Skip restoring the dom0 home directory (--skip-dom0-home), or pass "
                    "--ignore-username-mismatch to continue anyway."
                )
            log(
                "NOTE: The archived dom0 home directory will be restored to a new directory "
                "'home-restore-<current-time>' created inside the dom0 home directory. Restored files "
                "should be copied or moved out of the new directory before using them."
            )
        if not args.passphrase_file and not _confirm("Do you want to proceed?"):
            raise SimError("Restore canceled")
        r.restore_data(plan)
        log("-> Done.", BACKUP_LOG)
        if not opts.verify_only:
            log("-> Please install updates for all the restored templates.", BACKUP_LOG)
        return 0
    finally:
        r.cleanup()


def qvm_run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qvm-run")
    p.add_argument("-p", "--pass-io", action="store_true")
    p.add_argument("--service", action="store_true")
    p.add_argument("-u", "--user")
    p.add_argument("-n", "--no-autostart", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--no-gui", "--nogui", action="store_true")
    p.add_argument("--filter-escape-chars", action="store_true")
    p.add_argument("--no-filter-escape-chars", action="store_true")
    p.add_argument("vm")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    world = _world()
    world.get_qube(args.vm)
    if not world.is_running(args.vm):
        if args.no_autostart:
            print(f"qvm-run: error: Qube {args.vm} is not running", file=sys.stderr)
            return 1
        world.set_running(args.vm, True)
    if args.service:
        from . import qrexec

        proc = qrexec.start_service(world, args.vm, args.cmd[0], stdout=None, stderr=None)
        proc.stdin.close()
        return proc.wait()
    env = world.qube_env(args.vm)
    stdio = {} if args.pass_io else {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
    # qubes.VMShell: the command line goes to the qube's shell
    return subprocess.call(["bash", "-c", " ".join(args.cmd)], env=env, cwd=env["HOME"], **stdio)


def qvm_ls(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qvm-ls")
    p.add_argument("--raw-list", action="store_true")
    p.add_argument("--raw-data", action="store_true")
    p.add_argument("--fields", default="name,state,class,label,template,netvm")
    p.add_argument("--running", action="store_true")
    args = p.parse_args(argv)
    world = _world()
    fields = [f.strip().lower() for f in args.fields.split(",")]
    for q in sorted(world.load_qubes().values(), key=lambda q: q.name):
        if args.running and not world.is_running(q.name):
            continue
        if args.raw_list:
            print(q.name)
            continue
        values = {
            "name": q.name,
            "state": "Running" if world.is_running(q.name) else "Halted",
            "class": q.klass,
            "label": q.label,
            "template": q.template or "-",
            "netvm": q.netvm or "-",
            "qid": str(q.qid),
            "include_in_backups": str(q.include_in_backups),
        }
        row = [values.get(f, "-") for f in fields]
        print("|".join(row) if args.raw_data else " ".join(f"{v:<16}" for v in row))
    return 0


def qvm_prefs(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qvm-prefs")
    p.add_argument("vm")
    p.add_argument("prop", nargs="?")
    p.add_argument("value", nargs="?")
    args = p.parse_args(argv)
    world = _world()
    qubes = world.load_qubes()
    q = world.get_qube(args.vm)
    props = {
        "qid": q.qid,
        "name": q.name,
        "klass": q.klass,
        "label": q.label,
        "template": q.template,
        "netvm": q.netvm,
        "include_in_backups": q.include_in_backups,
    }
    if args.prop is None:
        for k, v in props.items():
            print(f"{k:<20} {'' if v is None else v}")
        return 0
    if args.prop not in props:
        raise SimError(f"no such property: '{args.prop}'", 2)
    if args.value is None:
        # qvm_prefs.py process_actions prints nothing for None, which a vm-type property with no qube
        # is (client base.py v4.4.0 l.322-325: '' -> None)
        if (value := props[args.prop]) not in (None, ""):
            print(value)
        return 0
    if args.prop == "include_in_backups":
        qubes[q.name].include_in_backups = args.value.lower() in ("1", "true", "yes")
    elif args.prop in ("label", "template", "netvm"):
        setattr(qubes[q.name], args.prop, args.value or None)
    else:
        raise SimError(f"property '{args.prop}' is read-only here", 2)
    world.save_qubes(qubes)
    return 0


def qvm_start(argv: list[str], running: bool = True) -> int:
    world = _world()
    for name in argv:
        world.get_qube(name)
        world.set_running(name, running)
    return 0


def qvm_check(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qvm-check")
    p.add_argument("--running", action="store_true")
    p.add_argument("vm")
    args = p.parse_args(argv)
    world = _world()
    try:
        world.get_qube(args.vm)
    except SimError:
        print(f"qvm-check: error: no such domain: '{args.vm}'", file=sys.stderr)
        return 2
    if args.running and not world.is_running(args.vm):
        print(f"{args.vm}: not running", file=sys.stderr)
        return 1
    print(f"{args.vm}: exists" + (" and is running" if args.running else ""))
    return 0


def qubes_prefs(argv: list[str]) -> int:
    """The storage defaults only (facts V8): every default_pool_* is default_pool, the pool `init
    --pool` gave every volume (upstream's default_pool_kernel is linux-kernel; not emulated)."""
    p = argparse.ArgumentParser(prog="qubes-prefs")
    p.add_argument("prop", nargs="?")
    args = p.parse_args(argv)
    pool = _world().default_pool
    props = {f"default_pool{v}": pool for v in ("", "_private", "_root", "_volatile")}
    if args.prop is None:  # qvm_prefs.py process_actions: NAME, D (a default), the value
        width = max(map(len, props))
        print("\n".join(f"{k:{width}s}  D  {v}" for k, v in props.items()))
    elif args.prop.replace("-", "_") in props:
        print(props[args.prop.replace("-", "_")])
    else:
        raise SimError(f"no such property: '{args.prop}'", 2)
    return 0


TOOLS = {
    "qvm-backup": qvm_backup,
    "qvm-backup-restore": qvm_backup_restore,
    "qvm-run": qvm_run,
    "qvm-ls": qvm_ls,
    "qvm-prefs": qvm_prefs,
    "qvm-start": qvm_start,
    "qvm-shutdown": lambda a: qvm_start([x for x in a if not x.startswith("-")], running=False),
    "qvm-check": qvm_check,
    "qvm-volume": storage.qvm_volume,
    "qvm-pool": storage.qvm_pool,
    "qubes-prefs": qubes_prefs,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tool = argv.pop(0)
    try:
        return TOOLS[tool](argv)
    except SimError as e:
        print(
            f"{tool}: error: {e}" if not str(e).startswith(("*** ", "Backup error")) else str(e),
            file=sys.stderr,
        )
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
