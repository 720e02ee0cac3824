"""`qtb-pipe backup`: stock qvm-backup through the shim into the backup qube's adapter, then the
cross-check, the sealed manifest, the commit and dom0's confirmation of it. Any failure leaves the
snapshot pending (never listed as complete)."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

from scrypt_shim import shim

from .. import manifest, proc, qubes, shim_install
from ..adapter import Adapter, Member, adapter_failure
from ..config import Config, load_secret, root
from ..errors import EXIT_FAILED, EXIT_QUBE, EXIT_SHIM, EXIT_USAGE, EXIT_VERIFY, PartialFailure, QtbError
from ..fingerprint import Unknown, domains, explicit, fingerprints
from ..records import SnapshotRecord, catalog, check_records_writable, save_record
from ..runs import Run, ShimRecord
from ..ui import Progress, human_bytes, human_duration, info, short_id, warn

TRAILER = shim.TRAILER_SIZE


@dataclass
class Selection:
    included: list[str]
    left_out: dict[str, str]  # qube -> why


def refuse_unknown(names: list[str], all_qubes: dict) -> None:
    if unknown := sorted({n for n in names if n not in all_qubes}):
        raise QtbError(f"unknown qube(s): {', '.join(unknown)} (see qvm-ls)", EXIT_USAGE)


def select_qubes(
    cfg: Config, all_qubes: dict[str, qubes.QubeInfo], names: list[str], exclude: list[str]
) -> Selection:
    """What will be backed up, and why the rest is not; the same logic `config check` shows."""
    refuse_unknown(names + exclude + cfg.include + cfg.exclude, all_qubes)
    wanted = names or cfg.include
    left_out: dict[str, str] = {}
    included = []
    for name, q in sorted(all_qubes.items(), key=lambda kv: kv[1].qid):
        if wanted:
            if name not in wanted:
                left_out[name] = "not in the list" if names else "not in config include"
                continue
        elif not q.include_in_backups:
            left_out[name] = "include_in_backups is false"
            continue
        if name in exclude:
            left_out[name] = "excluded with -x"
        elif name in cfg.exclude:
            left_out[name] = "excluded in config"
        elif name == cfg.backup_qube:
            left_out[name] = "it is the backup qube"
        else:
            included.append(name)
    return Selection(included, left_out)


def expected_members(records: list[ShimRecord]) -> list[Member]:
    """The stream's members as the shim saw them: header plain, its .hmac and every chunk sealed."""
    header = next(r for r in records if r.path == shim.HEADER_PATH)
    members = [Member(shim.HEADER_PATH, header.size), Member(shim.HEADER_MEMBER, header.size + TRAILER)]
    members += [Member(r.path + ".enc", r.size + TRAILER) for r in records if r.path != shim.HEADER_PATH]
    return members


def check_run(records: list[ShimRecord], stored: list[Member]) -> str:
    """Every member the adapter stored has an ok shim record of the same size, in order; nothing
    failed. Returns the backup_id. (qubesd ignores chunk exit codes: this is where they count.)"""
    failed = [r for r in records if r.status != "ok"]
    if failed:
        raise QtbError(f"the shim failed on {failed[0].path}: {failed[0].error[:200]}", EXIT_FAILED)
    enc = [r for r in records if r.op == "enc"]
    if not any(r.path == shim.HEADER_PATH for r in enc):
        raise QtbError(
            "the shim recorded no backup header: was the scrypt shim used? (qtb-pipe shim-status)", EXIT_SHIM
        )
    ids = {r.backup_id for r in enc}
    if len(ids) != 1 or None in ids:
        raise QtbError("shim records disagree on the backup id", EXIT_FAILED)
    expected = expected_members(enc)
    if expected != stored:  # Members compare by name and size
        diffs = [
            f"{e.name} ({e.size}) vs stored {s.name} ({s.size})"
            for e, s in zip(expected, stored, strict=False)
            if e != s
        ]
        diff = diffs[0] if diffs else f"{len(expected)} members made, {len(stored)} stored"
        raise QtbError(f"what the backup qube stored does not match what dom0 sent: {diff}", EXIT_FAILED)
    return ids.pop()


def confirm_commit(adapter: Adapter, snapshot_id: str, sealed: bytes) -> str:
    """A commit is complete only once the repository serves, for the id it answered, the manifest dom0
    sealed (an id that stored nothing, or an older snapshot's, fails here; save_record then refuses to
    replace a record with another manifest)."""
    try:
        ok = adapter.manifest(snapshot_id) == sealed
    except QtbError:
        ok = False
    if not ok:
        raise QtbError(
            f"the backup qube reported snapshot {snapshot_id} committed but does not serve the manifest "
            "dom0 sealed for it; nothing was recorded",
            EXIT_VERIFY,
        )
    return snapshot_id


def qube_entries(all_qubes: dict[str, qubes.QubeInfo], names: list[str]) -> dict[str, manifest.QubeEntry]:
    """Where each qube's files are in the stream (qubesd: vm<qid>/, dom0's home last) and what it
    needs where it is restored: its template and its net qube if set explicitly (restore checks those)."""
    settings = domains()
    return {
        name: manifest.QubeEntry(
            manifest.DOM0_HOME if name == "dom0" else f"vm{all_qubes[name].qid}/",
            all_qubes[name].klass,
            explicit(settings.get(name), "template"),
            explicit(settings.get(name), "netvm"),
        )
        for name in names
    }


def backup_unit(
    cfg: Config,
    adapter: Adapter,
    secret: str,
    entries: dict[str, manifest.QubeEntry],
    fingerprints: dict[str, str | None],
    progress: Progress,
) -> dict:
    """One stock qvm-backup run of these qubes, committed and recorded, or nothing at all. Returns
    what the summary says of it."""
    run = Run()
    passphrase_file = run.create(secret)
    try:
        location = adapter.store_location(run.run_id)
        res = qubes.qvm_backup(
            cfg.backup_qube, location, str(passphrase_file), list(entries),
            lambda percent: progress.update(percent, run.streamed), cfg.stall_timeout,
        )  # fmt: skip
        progress.done()
        if res.code != 0:
            detail, code = adapter_failure(res.stderr)
            raise QtbError(f"qvm-backup failed: {detail}; nothing was committed", code)
        stored = adapter.pending_members(run.run_id)
        records = run.records()
        backup_id = check_run(records, stored)
        created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        chunks = [{"path": r.path, "size": r.size, "tag": r.tag} for r in records if r.op == "enc"]
        sealed = manifest.build(bytes.fromhex(secret), backup_id, created, cfg.engine, entries, chunks)
        committed = adapter.commit(run.run_id, sealed.sealed)
        snapshot_id = confirm_commit(adapter, committed["id"], sealed.sealed)
    finally:
        progress.done()
        run.remove()
    stream_bytes = sum(m.size for m in stored)
    save_record(
        SnapshotRecord(snapshot_id, cfg.engine, backup_id, created, fingerprints, stream_bytes, sealed.sha256)
    )
    added = committed.get("added_bytes")
    return {
        "status": "backed up",
        "snapshot": snapshot_id,
        "stream_bytes": stream_bytes,
        "added_bytes": added if type(added) is int else None,
        "warnings": [f"{', '.join(entries)}: {w}" for w in [qubes.qubes_xml_too_big(chunks)] if w],
    }


@dataclass
class Decision:
    """What tonight's run does with one qube, and why (backup, backup --dry-run, config check)."""

    qube: str
    back_up: bool
    why: str
    fingerprint: str | None
    estimate: int | None = None  # its newest copy's stream, when that copy was a run of its own


def plan_backup(engine: str, names: list[str], full: bool) -> list[Decision]:
    """A qube whose fingerprint equals the one recorded with its newest copy is skipped."""
    latest = {qube: copies[-1] for qube, copies in catalog(engine).items()}
    decisions = []
    for qube, found in fingerprints(names).items():
        known = latest.get(qube)
        alone = known.stream_bytes if known is not None and len(known.qubes) == 1 else None
        if isinstance(found, Unknown):
            decisions.append(Decision(qube, True, f"always backed up: {found}", None, alone))
        elif known is not None and known.qubes[qube] == found and not full:
            decisions.append(
                Decision(qube, False, f"unchanged since {short_id(known.id)} ({known.time})", found)
            )
        else:
            why = "--full" if full else f"changed since {short_id(known.id)}" if known else "no copy yet"
            decisions.append(Decision(qube, True, why, found, alone))
    return decisions


def planned(decisions: list[Decision]) -> dict[str, dict]:
    """The per-qube plan as `backup --dry-run --json` and `config check --json` give it."""
    plan = {d.qube: {"status": "to back up" if d.back_up else "unchanged", "why": d.why} for d in decisions}
    return {
        d.qube: {**plan[d.qube], "estimated_bytes": d.estimate} if d.back_up else plan[d.qube]
        for d in decisions
    }


def run_backup(
    cfg: Config,
    names: list[str],
    exclude: list[str],
    as_json: bool,
    full: bool = False,
    dry_run: bool = False,
) -> dict:
    secret = load_secret()
    if not dry_run:
        shim_install.require_shim(root())
    all_qubes = qubes.list_qubes()
    if cfg.backup_qube not in all_qubes:
        raise QtbError(f"backup qube '{cfg.backup_qube}' does not exist (config: backup_qube)", EXIT_QUBE)
    selection = select_qubes(cfg, all_qubes, names, exclude)
    if not selection.included:
        raise QtbError("nothing to back up: every qube is left out (see qtb-pipe config check)", EXIT_USAGE)
    decisions = plan_backup(cfg.engine, selection.included, full)
    summary: dict = {"engine": cfg.engine, "dry_run": dry_run, "qubes": planned(decisions)}
    summary.update(snapshots=[], warnings=[])
    if dry_run:
        sizes = [d.estimate for d in decisions if d.back_up]
        if not as_json:
            print_qubes(summary["qubes"])
            more = f", and {sizes.count(None)} qube(s) with no copy of their own yet" if None in sizes else ""
            print(f"about {human_bytes(sum(s or 0 for s in sizes))} to stream{more}")
        return summary
    if not all_qubes[cfg.backup_qube].running:
        if not cfg.start_backup_qube:
            raise QtbError(
                f"backup qube '{cfg.backup_qube}' is not running: qvm-start {cfg.backup_qube}", EXIT_QUBE
            )
        qubes.start_qube(cfg.backup_qube)
    adapter = Adapter(cfg.backup_qube, cfg.engine, cfg.adapter_command)
    adapter.snapshots()  # preflight: adapter present, repository ready, password right
    check_records_writable()
    adapter.ping("start")
    todo = [d for d in decisions if d.back_up]
    started = time.monotonic()
    failed: list[str] = []
    for number, d in enumerate(todo, start=1):
        # one qvm-backup per qube: what finished is committed, an interrupted night resumes with the rest
        info(
            f"qtb-pipe: backing up {d.qube} ({number}/{len(todo)}) to {cfg.engine} in '{cfg.backup_qube}'",
            as_json,
        )
        entry = summary["qubes"][d.qube]
        try:
            done = backup_unit(
                cfg, adapter, secret, qube_entries(all_qubes, [d.qube]), {d.qube: d.fingerprint},
                Progress("backup", [d.qube], as_json),
            )  # fmt: skip
        except QtbError as e:
            entry.update(status="failed", error=str(e), exit_code=e.code)
            failed.append(d.qube)
            info(f"qtb-pipe: {d.qube} failed: {proc.printable(str(e), 500)}", as_json)
            continue
        summary["warnings"] += done.pop("warnings")
        entry.update(done)
        summary["snapshots"].append(done["snapshot"])
    elapsed = time.monotonic() - started
    streamed = sum(q.get("stream_bytes", 0) for q in summary["qubes"].values())
    added = [q["added_bytes"] for q in summary["qubes"].values() if isinstance(q.get("added_bytes"), int)]
    summary.update(
        stream_bytes=streamed, added_bytes=sum(added) if added else None, seconds=round(elapsed, 2)
    )
    for warning in [] if as_json else summary["warnings"]:  # not notes: -q shows them too
        warn(warning)
    outcome = (f"{len(summary['snapshots'])} qube(s) backed up: {human_bytes(streamed)} streamed, "
               f"{human_bytes(summary['added_bytes'])} added, {human_duration(elapsed)}")  # fmt: skip
    if not as_json:
        print_qubes(summary["qubes"])
        print(outcome)
    if failed:
        first = summary["qubes"][failed[0]]
        message = f"{len(failed)} qube(s) not backed up: {', '.join(failed)} ({failed[0]}: {first['error']})"
        adapter.ping("fail", f"{message}\n{outcome}")
        raise PartialFailure(message, first["exit_code"], summary)
    adapter.ping("success", outcome)  # the body healthchecks shows with the ping
    return summary


PLAN_LABELS = {"to back up": "will be backed up", "unchanged": "skipped"}  # JSON status -> text


def print_qubes(planned_or_done: dict[str, dict]) -> None:
    for qube, entry in planned_or_done.items():
        state = PLAN_LABELS.get(entry["status"], entry["status"])
        estimate = entry.get("estimated_bytes") if entry["status"] == "to back up" else None
        about = f" (about {human_bytes(estimate)})" if estimate is not None else ""
        print(f"  {qube:<24} {state:<18} {entry['why']}{about}")
