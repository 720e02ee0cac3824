"""`qtb-pipe restore` and `qtb-pipe verify`: the sealed manifest is fetched and verified first, then
the stock qvm-backup-restore reads the stream from the adapter and the shim checks every chunk
against the pass's plan before any plaintext reaches dom0's parsers."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from scrypt_shim import shim

from .. import manifest, proc, qubes, shim_install
from ..adapter import Adapter, check_snapshot_id
from ..config import Config, load_secret, root
from ..errors import EXIT_FAILED, EXIT_SNAPSHOT, EXIT_USAGE, EXIT_VERIFY, PartialFailure, QtbError
from ..manifest import DOM0_HOME, Manifest, QubeEntry
from ..qubes import RestoreFlags
from ..records import catalog, load_records
from ..runs import Run
from ..ui import Progress, human_bytes, info


@dataclass
class RestoreOptions:
    snapshot: str
    qubes: list[str] = field(default_factory=list)  # empty: every qube of the snapshot
    flags: RestoreFlags = field(default_factory=RestoreFlags)
    single_pass: bool = False  # skip the verify-only pass before the real one
    new_system: bool = False  # dom0 has no record of the snapshot: trust its sealed manifest alone
    as_json: bool = False


def resolve_snapshot_id(engine: str, snapshot_id: str) -> str:
    """A unique prefix (8+ characters) of a snapshot dom0 recorded stands for its full id, as in
    restic; anything else is passed on as given (the adapter resolves prefixes in its repository)."""
    ids = [sid for eng, sid in load_records() if eng == engine]
    if len(snapshot_id) < 8 or snapshot_id in ids:
        return snapshot_id
    matches = [sid for sid in ids if sid.startswith(snapshot_id)]
    return matches[0] if len(matches) == 1 else snapshot_id


def fetch_manifest(
    adapter: Adapter, snapshot_id: str, secret: str, quiet: bool, new_system: bool
) -> Manifest:
    """The snapshot's sealed manifest, verified with the secret and against dom0's record."""
    sealed = adapter.manifest(snapshot_id)  # the adapter refuses unknown and pending snapshots
    try:
        found = manifest.verify(bytes.fromhex(secret), sealed)
    except QtbError as e:
        raise QtbError(f"snapshot {snapshot_id}: manifest rejected: {e}", EXIT_VERIFY) from None
    record = load_records().get((adapter.engine, snapshot_id))
    if record is None:
        # Without dom0's record, any genuine manifest (an older backup too) would verify: make it explicit.
        if not new_system:
            raise QtbError(
                f"dom0 has no record of snapshot {snapshot_id}: if this is a new system restoring with "
                "the recovery key, add --new-system (then check the backup date it shows)",
                EXIT_VERIFY,
            )
        info(
            f"note: dom0 has no record of snapshot {snapshot_id} (--new-system): it is backup "
            f"{found.backup_id} of {found.created}, authenticated by its manifest",
            quiet,
        )
    elif found.sha256 != record.manifest_sha256 or found.backup_id != record.backup_id:
        raise QtbError(
            f"snapshot {snapshot_id}: the backup qube served a manifest that is not the one dom0 "
            "committed (another or an older backup); nothing was restored",
            EXIT_VERIFY,
        )
    return found


def refuse_before_data(
    entries: dict[str, QubeEntry], chosen: list[str], host: dict, flags: RestoreFlags
) -> dict[str, str]:
    """What qvm-backup-restore would refuse, said before any data is read: a name that is taken, a
    template or (explicit) net qube neither here nor restored with them, which it marks broken (facts
    §4; restore.py restore_info_verify). Returns the broken qubes (--skip-broken leaves them out)."""
    broken = {}
    for name in chosen:
        q = entries[name]
        template_here = q.template in host and host[q.template].klass == "TemplateVM"
        template_with = q.template in chosen and entries[q.template].klass == "TemplateVM"
        if q.template and not (template_here or template_with):
            broken[name] = f"{name} needs template {q.template}"
        elif q.netvm and q.netvm not in host and q.netvm not in chosen:
            broken[name] = f"{name} needs net qube {q.netvm}"
    if broken and not (flags.skip_broken or flags.ignore_missing):
        raise QtbError(
            f"{'; '.join(broken.values())}: restore those first (restore --all does), or add --skip-broken "
            "or --ignore-missing (qvm-backup-restore refuses otherwise)",
            EXIT_USAGE,
        )
    taken = [n for n in chosen if n in host and n != "dom0"]
    if taken and not (flags.verify_only or flags.rename_conflicting or flags.skip_conflicting):
        raise QtbError(
            f"{', '.join(taken)}: a qube of that name exists; remove it, or add --rename-conflicting or "
            "--skip-conflicting",
            EXIT_USAGE,
        )
    return broken


def left_out(flags: RestoreFlags, broken: dict[str, str], host: dict) -> set[str]:
    """What the tool will not restore of those chosen: dom0's home with --skip-dom0-home, the broken
    with --skip-broken, a name taken with --skip-conflicting (not retrieved; dom0's home never is)."""
    skip = ({"dom0"} if flags.skip_dom0_home else set()) | (set(broken) if flags.skip_broken else set())
    return skip | (set(host) - {"dom0"} if flags.skip_conflicting and not flags.verify_only else set())


def refuse_another_users_home(copies: list[Manifest], chosen: list[str], flags: RestoreFlags) -> None:
    """The tool refuses another user's dom0 home after the verify pass (handle_broken): said before it."""
    chunks = [c["path"] for m in copies for c in m.chunks_of([DOM0_HOME])]
    home_of = {path.split("/")[1].rsplit(".", 1)[0] for path in chunks}  # USER.000: USER may hold a dot
    home_as_asked = flags.verify_only or flags.skip_dom0_home or flags.ignore_username_mismatch
    user = qubes.dom0_user()  # (paranoid mode restores no home)
    if "dom0" in chosen and home_of and not (home_as_asked or flags.paranoid_mode) and user not in home_of:
        raise QtbError(
            f"dom0's home in this snapshot is {', '.join(home_of)}'s, and this dom0's user is {user}: "
            "add --skip-dom0-home, or --ignore-username-mismatch to restore it into ~/home-restore-*",
            EXIT_USAGE,
        )


VOLUME_FILE = re.compile(r"vm[0-9]+/(private|root)\.img")  # a chunk's file (shim.CHUNK_PATH_RE)
SIZED_DRIVERS = ("lvm_thin", "file", "file-reflink")  # what they hold is what was written (zfs compresses)


def pool_room(info: dict[str, str]) -> int | None:
    """A pool's size less its usage (qvm-pool info, facts V2); None when it does not say: no such rows,
    another driver, or size 0 (lvm_thin's when qubesd cannot find its thin pool, lvm.py l.194-210)."""
    size, usage = info.get("size", ""), info.get("usage", "")
    if info.get("driver") in SIZED_DRIVERS and size.isdigit() and usage.isdigit() and int(size) > 0:
        return int(size) - int(usage)
    return None


def refuse_short_of_pool_space(chunks: list[dict], flags: RestoreFlags) -> int:
    """The volumes restored go to the default pools, which the tool does not check (facts V8): a full
    thin pool fails the import midway, with qubes half made. Refused when a pool's room is less than
    its private and root volumes as backed up (a lower bound: no margin is asked). Returns the bytes
    going to a pool on dom0's home's file system (a btrfs install's file-reflink pool)."""
    volumes: Counter[str] = Counter()
    for c in chunks if not flags.verify_only else []:
        chunk = shim.CHUNK_PATH_RE.fullmatch(c["path"])
        if chunk and (volume := VOLUME_FILE.fullmatch(chunk["file"])):
            volumes[volume[1]] += c["size"]
    need: Counter[str] = Counter()
    for volume, size in volumes.items():
        need[qubes.default_pool(volume)] += size
    on_home = 0
    for pool, size in need.items():
        info = qubes.pool_info(pool) if pool else {}
        if (room := pool_room(info)) is not None and room < size:
            raise QtbError(
                f"pool {pool} has {human_bytes(room)} free and the restored qubes' private and root volumes "
                f"need {human_bytes(size)} there: free space in it, or restore fewer qubes"
            )
        with contextlib.suppress(OSError, KeyError):  # a file pool's directory: no dir_path, no sharing
            on_home += size if os.stat(info["dir_path"]).st_dev == os.stat(Path.home()).st_dev else 0
    return on_home


UNPACKER_MARGIN = 500 << 20  # qfile-dom0-unpacker -w: below this much free it waits, with no timeout (R1)


def refuse_short_of_space(chunks: list[dict], flags: RestoreFlags) -> None:
    """The tool's temporary directory and a restored home are in dom0's home: room for the largest chunk
    and the unpacker's margin (else the restore stalls), and for the home when it is restored; and
    first the pools for the volumes, counted here too for a pool on the same file system."""
    pooled = refuse_short_of_pool_space(chunks, flags)
    if flags.paranoid_mode:  # it restores in a disposable, and no home
        return
    homes = 0 if flags.verify_only else sum(c["size"] for c in chunks if c["path"].startswith(DOM0_HOME))
    need = max((c["size"] + shim.TRAILER_SIZE for c in chunks), default=0) + UNPACKER_MARGIN + homes + pooled
    need = max(need, 1 << 30)  # the tool's own check_disk_space asks for 1 GiB there (facts R1)
    if (free := shutil.disk_usage(Path.home()).free) < need:
        what = "the largest chunk, the 500 MiB the unpacker keeps free" + (", dom0's home" if homes else "")
        what += ", the volumes of a pool on it" if pooled else ""
        what += "; at least the 1 GiB qvm-backup-restore asks for" if need == 1 << 30 else ""
        raise QtbError(
            f"dom0's home has {human_bytes(free)} free and this restore needs {human_bytes(need)} there "
            f"({what}): free space in {Path.home()}, or restore fewer qubes"
        )


def bounds(plan: list[dict], prefixes: list[str]) -> tuple[int, int, int]:
    """What this pass may write in dom0 (docs/design.md): the largest file (a chunk as sent, or the
    dom0 home's inner stream, unpacked into ~/home-restore-*), and the temporary directory: every
    chunk as sent, two more, 8 KiB of rounding per chunk and a MiB for the tool's own files, in at
    most two entries per chunk and 64 more."""
    sent = [c["size"] + shim.TRAILER_SIZE for c in plan]
    home = sum(c["size"] for c in plan if c["path"].startswith(DOM0_HOME))
    largest = max([*sent, home if DOM0_HOME in prefixes else 0])
    return largest, sum(sent) + 2 * max(sent) + 8192 * len(sent) + (1 << 20), 2 * len(sent) + 64


def restore_pass(
    cfg: Config,
    found: Manifest,
    location: str,
    secret: str,
    prefixes: list[str],
    flags: RestoreFlags,
    as_json: bool,
) -> None:
    """One stock qvm-backup-restore run with its own run directory and plan: every chunk under
    `prefixes` must be accepted, in stream order, and nothing else. Its progress is the bytes of
    the chunks the shim accepted."""
    names = [name for name, q in found.qubes.items() if q.path in prefixes]
    action = "verify" if flags.verify_only else "restore"
    if flags.verify_only:  # else qvm-backup-restore leaves another user's dom0 home unread (R4)
        flags = replace(flags, ignore_username_mismatch=True)
    if DOM0_HOME not in prefixes and found.chunks_of([DOM0_HOME]):
        flags = replace(flags, skip_dom0_home=True)  # a list of qubes does not leave it out (R4)
    progress = Progress(action, names, as_json)
    run = Run()
    passphrase_file = str(run.create(secret))
    try:
        plan = run.write_plan(found, prefixes)
        host = {} if flags.verify_only else qubes.list_qubes()
        bound = bounds(plan, prefixes)
        done = list(itertools.accumulate((c["size"] for c in plan), initial=0))  # bytes, by chunks accepted

        def accepted() -> int:  # the stall marker, drawn as progress
            count = min(run.accepted(), len(plan))
            progress.update(100 * done[count] / max(done[-1], 1), done[count])
            return count

        res = qubes.qvm_backup_restore(
            cfg.backup_qube, location, passphrase_file, flags, names, bound, cfg.stall_timeout, accepted
        )
        if not (as_json or flags.verify_only) and res.stdout:  # what it restored, as it says
            sys.stdout.write(proc.printable(res.stdout.decode(errors="replace"), 100_000))
        failure = run.failure()
        if failure:
            raise QtbError(f"refused: {failure}; nothing unverified was restored", EXIT_VERIFY)
        if cut := unpacker_refusal(res.stderr, location):
            too_big = f"larger than the manifest allows (dom0 cut it at {bound[0]} bytes)"
            what = "twice (dom0's unpacker never overwrites one)" if cut == b"17" else too_big
            refusal = f"refused: the backup qube served a file {what}; nothing unverified was restored"
            raise QtbError(refusal, EXIT_VERIFY)
        if res.code != 0:
            raise QtbError(
                f"qvm-backup-restore failed: {proc.one_line(res.stderr, 'no message')}", EXIT_FAILED
            )
        missing = plan[run.accepted() :]
        if missing:
            # Only the tail of the pass can get here: the shim refuses any other gap.
            raise QtbError(
                f"the backup qube did not serve {len(missing)} chunk(s) of the snapshot "
                f"(first: {missing[0]['path']}): that qube is incomplete; remove it and restore again",
                EXIT_VERIFY,
            )
        if not flags.verify_only:
            confirm_restored(res.stderr, [n for n in names if n != "dom0"], host, flags.rename_conflicting)
    finally:
        progress.done()
        run.remove()


# The unpacker killed by SIGXFSZ at the file size bound set from the manifest (RLIMIT_FSIZE), or
# exiting EEXIST (17) on a name served twice (unpack.c ~l.218-220), as restore.py ~l.1592-1597
# reports it: "unable to read the qubes backup file LOCATION (-25): …". LOCATION is the driver's own
# dump command; the backup qube's stderr only comes after it, so only the first occurrence counts.
def unpacker_refusal(stderr: bytes, location: str) -> bytes | None:
    found = re.search(
        rb"unable to read the qubes backup file " + re.escape(location.encode()) + rb" \((-?[0-9]+)\):",
        stderr,
    )
    return found[1] if found and found[1] in (b"-25", b"17") else None


# What stock qvm-backup-restore logs, and still exits 0, when a qube's data did not make it
# (qubesadmin/backup/restore.py: restore_do ~l.2039-2042, _handle_volume_data ~l.1959, ExtractWorker
# ~l.535, ~l.645 and ~l.777, the qube creation ~l.2122).
RESTORE_FAILURES = re.compile(
    r"qubesadmin\.backup(\.extract)?: (Error extracting data|Failed to restore volume|Error restoring VM"
    r"|Unexpected file in archive|Error while processing|ERROR: unable to extract files)\b.*"
)


def confirm_restored(stderr: bytes, names: list[str], host_before: dict, renamed: bool) -> None:
    """After a restore pass, from dom0's side: the tool logged no lost data, and every qube it was to
    create exists (a renamed copy has a name only the tool knows: those are counted)."""
    lines = [proc.printable(ln, 300) for ln in stderr.decode("ascii", "replace").splitlines()]
    failures = [ln for ln in lines if RESTORE_FAILURES.fullmatch(ln)]
    if failures:
        raise QtbError(f"qvm-backup-restore exited 0 but reported: {failures[0]}", EXIT_FAILED)
    now = qubes.list_qubes()
    absent = [n for n in names if n not in host_before and n not in now]
    copies = [f"a renamed copy of {n}" for n in names if n in host_before] if renamed else []
    absent += copies[len(set(now) - set(host_before) - set(names)) :]
    if absent:
        raise QtbError(f"qvm-backup-restore exited 0 but did not create {', '.join(absent)}", EXIT_FAILED)


def run_restore(cfg: Config, opts: RestoreOptions, found: Manifest | None = None) -> dict:
    """One snapshot (its qubes, or those of opts.qubes); `found`: its manifest, if already verified."""
    check_snapshot_id(opts.snapshot)
    secret = load_secret()
    shim_install.require_shim(root(), for_restore=True)
    adapter = Adapter(cfg.backup_qube, cfg.engine, cfg.adapter_command)
    snapshot_id = resolve_snapshot_id(cfg.engine, opts.snapshot)
    found = found or fetch_manifest(adapter, snapshot_id, secret, opts.as_json, opts.new_system)
    unknown = [n for n in opts.qubes if n not in found.qubes]
    if unknown:
        raise QtbError(
            f"not in snapshot {snapshot_id}: {', '.join(unknown)} (it has: {', '.join(found.qubes)})",
            EXIT_USAGE,
        )
    chosen = opts.qubes or list(found.qubes)
    if too_big := qubes.qubes_xml_too_big(found.chunks):  # it would fail, saying only "unexpected
        raise QtbError(f"snapshot {snapshot_id}: {too_big}")  # files in archive: got []" (R8)
    host = qubes.list_qubes()
    broken = refuse_before_data(found.qubes, chosen, host, opts.flags)
    refuse_another_users_home([found], chosen, opts.flags)
    skip = left_out(opts.flags, broken, host)
    prefixes = [found.qubes[n].path for n in chosen if n not in skip]
    if not prefixes:
        raise QtbError(f"nothing to restore: {', '.join(chosen)} skipped (names taken, or dom0's home)")
    refuse_short_of_space(found.chunks_of(prefixes), opts.flags)
    location = adapter.dump_location(snapshot_id)
    if not opts.flags.verify_only and not opts.single_pass:
        # A verify-only pass first: a backup qube that serves bad data is refused before
        # qvm-backup-restore creates any qube (the real pass re-checks everything anyway).
        info("qtb-pipe: pass 1/2, verifying every chunk before anything is restored", opts.as_json)
        verify_first = replace(opts.flags, verify_only=True)
        restore_pass(cfg, found, location, secret, prefixes, verify_first, opts.as_json)
        info("qtb-pipe: pass 2/2, restoring", opts.as_json)
    else:
        what = "verifying" if opts.flags.verify_only else "restoring"
        info(
            f"qtb-pipe: {what} snapshot {snapshot_id} ({cfg.engine}, backup {found.backup_id})", opts.as_json
        )
    restore_pass(cfg, found, location, secret, prefixes, opts.flags, opts.as_json)
    return {
        "snapshot": snapshot_id,
        "engine": cfg.engine,
        "backup_id": found.backup_id,
        "verified_only": opts.flags.verify_only,
        "qubes": per_qube_report(found, prefixes),
    }


def latest_copies(
    cfg: Config, names: list[str], as_of: str | None, new_system: bool, quiet: bool, skip: set[str]
) -> tuple[dict[str, Manifest], dict[str, tuple[list[str], QtbError]]]:
    """Each qube's newest copy (made at or before `as_of`; none of `skip`), as {snapshot: its verified
    manifest}: from dom0's records, or on a new system from the repository, every manifest
    authenticated; and {snapshot: (its chosen qubes, why)} for those whose manifest could not be had."""
    adapter = Adapter(cfg.backup_qube, cfg.engine, cfg.adapter_command)
    secret = load_secret()
    newest: dict[str, tuple[str, str]] = {}  # qube -> (time, snapshot)
    found: dict[str, Manifest] = {}
    failed: dict[str, tuple[list[str], QtbError]] = {}
    if new_system:
        for snap in adapter.complete():
            try:
                m = found[snap.snapshot] = fetch_manifest(adapter, snap.snapshot, secret, True, True)
            except QtbError as e:  # what it holds is unknown until it verifies: it is reported
                failed[snap.snapshot] = ([], e)
                continue
            for qube in m.qubes if as_of is None or m.created <= as_of else ():
                newest[qube] = max(newest.get(qube, ("", "")), (m.created, snap.snapshot))
    else:
        newest = {qube: (recs[-1].time, recs[-1].id) for qube, recs in catalog(cfg.engine, as_of).items()}
    if not newest:
        hint = f" made by {as_of}" if as_of else ""
        raise QtbError(
            f"no copy of any qube{hint} in {cfg.engine} (on a new system: --new-system)", EXIT_SNAPSHOT
        )
    unknown = [n for n in names if n not in newest]
    if unknown:
        raise QtbError(
            f"no copy of {', '.join(unknown)} (qubes with copies: {', '.join(sorted(newest))})", EXIT_USAGE
        )
    groups: dict[str, list[str]] = {}
    for qube in (q for q in names or newest if q not in skip):
        groups.setdefault(newest[qube][1], []).append(qube)
    manifests = {}
    for snapshot, chosen in groups.items():
        try:
            m = found.get(snapshot) or fetch_manifest(adapter, snapshot, secret, quiet, False)
            manifests[snapshot] = replace(m, qubes={q: m.qubes[q] for q in chosen})
        except QtbError as e:  # one qube's copy failing leaves the others to restore
            failed[snapshot] = (chosen, e)
    return manifests, failed


def restore_order(manifests: dict[str, Manifest]) -> list[str]:
    """Each snapshot after those holding its qubes' templates and net qubes (chains like sys-firewall
    -> sys-net too: qvm-backup-restore refuses a qube whose are missing); dom0's home last."""
    entries = {n: q for m in manifests.values() for n, q in m.qubes.items()}

    def depth(name: str, seen: frozenset[str] = frozenset()) -> int:
        q = entries.get(name)
        if q is None or name in seen:  # not restored here (or a loop): nothing to wait for
            return 0
        return 1 + max(depth(d or "", seen | {name}) for d in (q.template, q.netvm))

    admin = {s for s, m in manifests.items() if any(q.klass == "AdminVM" for q in m.qubes.values())}
    return sorted(manifests, key=lambda s: (s in admin, max(depth(n) for n in manifests[s].qubes)))


def run_restore_latest(cfg: Config, opts: RestoreOptions, names: list[str], as_of: str | None) -> dict:
    """`restore --all` / `--qube NAME` and `verify` without a snapshot: one stock restore per snapshot
    that holds a chosen qube's newest copy. A qube whose copy fails is reported; the others go on."""
    skip = {"dom0"} if opts.flags.skip_dom0_home else set()  # dom0's home: a snapshot of its own
    manifests, unreadable = latest_copies(cfg, names, as_of, opts.new_system, opts.as_json, skip)
    entries, host = {name: q for m in manifests.values() for name, q in m.qubes.items()}, qubes.list_qubes()
    broken = refuse_before_data(entries, list(entries), host, opts.flags)  # all of it, first
    refuse_another_users_home(list(manifests.values()), list(entries), opts.flags)
    skip = left_out(opts.flags, broken, host)
    restored = [
        c
        for m in manifests.values()
        for c in m.chunks_of([q.path for n, q in m.qubes.items() if n not in skip])
    ]
    refuse_short_of_space(restored, opts.flags)  # the whole of it, before the first snapshot's restore
    result: dict = {
        "engine": cfg.engine,
        "verified_only": opts.flags.verify_only,
        "qubes": {},
        "snapshots": [],
        "unreadable": {s: str(e) for s, (chosen, e) in unreadable.items() if not chosen},
    }
    problems: list[tuple[str, QtbError]] = []

    def failed(snapshot: str, chosen: list[str], e: QtbError) -> None:
        problems.append((", ".join(chosen) or f"snapshot {snapshot}", e))
        result["qubes"].update(
            {q: {"snapshot": snapshot, "ok": False, "error": str(e), "exit_code": e.code} for q in chosen}
        )
        info(f"qtb-pipe: {problems[-1][0]} failed: {e}", opts.as_json)

    for snapshot, (chosen, e) in unreadable.items():
        failed(snapshot, chosen, e)
    for snapshot in restore_order(manifests):
        chosen = list(manifests[snapshot].qubes)
        try:
            done = run_restore(cfg, replace(opts, snapshot=snapshot, qubes=chosen), manifests[snapshot])
            result["qubes"].update(
                {q: {**r, "snapshot": snapshot, "ok": True} for q, r in done["qubes"].items()}
            )
        except QtbError as e:
            failed(snapshot, chosen, e)
        result["snapshots"].append(snapshot)
    if problems:
        (what, e), listed = problems[0], "; ".join(w for w, _ in problems)
        raise PartialFailure(f"{len(problems)} failed: {listed} ({what}: {e})", e.code, result)
    return result


def per_qube_report(found: Manifest, prefixes: list[str]) -> dict:
    report = {}
    for name, q in found.qubes.items():
        chunks = found.chunks_of([q.path])
        done = q.path in prefixes  # the pass accepted every chunk under its prefixes, or failed
        report[name] = {
            "chunks": len(chunks),
            "verified": len(chunks) if done else 0,
            "bytes": sum(c["size"] for c in chunks) if done else 0,
        }
    return report


def print_report(result: dict) -> None:
    verb = "verified" if result["verified_only"] else "restored"
    for name, r in result["qubes"].items():
        if r.get("ok") is False:
            print(f"  {name:<24} FAILED: {r['error']}")
        elif r["verified"]:
            print(f"  {name:<24} {r['verified']}/{r['chunks']} chunks {verb}, {human_bytes(r['bytes'])}")
        else:
            print(f"  {name:<24} not selected")
