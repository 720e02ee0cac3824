"""`qtb-pipe backup`: stock qvm-backup through the shim into the backup qube's adapter, then the
cross-check, the sealed manifest and the commit. Any failure leaves the snapshot pending."""

from __future__ import annotations

import datetime
import hashlib
import time
from dataclasses import dataclass

from scrypt_shim import shim

from .. import qubes, shim_install
from ..adapter import Adapter, Member
from ..config import Config, SnapshotRecord, load_secret, root, save_record
from ..errors import EXIT_FAILED, EXIT_QUBE, EXIT_SHIM, EXIT_USAGE, QtbError
from ..runs import TRAILER, Run, ShimRecord, cleanup_stale_runs
from ..ui import Progress, human_bytes, human_duration, info

QUBES_XML_RETRIEVAL_CAP = 1024 * 1024


@dataclass
class Selection:
    included: list[str]
    left_out: dict[str, str]  # qube -> why


def select_qubes(
    cfg: Config, all_qubes: dict[str, qubes.QubeInfo], names: list[str], exclude: list[str]
) -> Selection:
    """What will be backed up, and why the rest is not; the same logic `config check` shows."""
    unknown = [n for n in names + exclude + cfg.include + cfg.exclude if n not in all_qubes]
    if unknown:
        raise QtbError(f"unknown qube(s): {', '.join(sorted(set(unknown)))} (see qvm-ls)", EXIT_USAGE)
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


def qubes_xml_warning(stored: list[Member]) -> str | None:
    """qvm-backup-restore fetches qubes.xml from a qube with a fixed 1 MiB cap (facts §3) that
    --ignore-size-limit does not lift: such a backup could not be restored from the backup qube."""
    xml = next((m for m in stored if m.name == "qubes.xml.000.enc"), None)
    if xml is None or xml.size <= QUBES_XML_RETRIEVAL_CAP:
        return None
    return (
        f"qubes.xml.000.enc is {xml.size} bytes, over the 1 MiB that qvm-backup-restore accepts from a qube: "
        "this snapshot can only be restored from a local copy of the stream (docs/emergency-restore.md)"
    )


def expected_members(records: list[ShimRecord]) -> list[Member]:
    """The stream's members as the shim saw them: header plain, its .hmac and every chunk sealed."""
    header = next(r for r in records if r.path == shim.HEADER_PATH)
    members = [Member("backup-header", header.size), Member("backup-header.hmac", header.size + TRAILER)]
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
    if [(m.name, m.size) for m in expected] != [(m.name, m.size) for m in stored]:
        diff = next(
            (
                f"{e.name} ({e.size}) vs stored {s.name} ({s.size})"
                for e, s in zip(expected, stored, strict=False)
                if (e.name, e.size) != (s.name, s.size)
            ),
            f"{len(expected)} members made, {len(stored)} stored",
        )
        raise QtbError(f"what the backup qube stored does not match what dom0 sent: {diff}", EXIT_FAILED)
    return ids.pop()


def run_backup(cfg: Config, names: list[str], exclude: list[str], as_json: bool) -> dict:
    secret = load_secret()
    status = shim_install.shim_status(root())
    if not status.qubesd_uses_shim:
        problems = "; ".join(status.problems) or "qubesd would not run it"
        raise QtbError(f"the scrypt shim is not active: {problems} (run: qtb-pipe install-shim)", EXIT_SHIM)
    all_qubes = qubes.list_qubes()
    if cfg.backup_qube not in all_qubes:
        raise QtbError(f"backup qube '{cfg.backup_qube}' does not exist (config: backup_qube)", EXIT_QUBE)
    if not all_qubes[cfg.backup_qube].running:
        if not cfg.start_backup_qube:
            raise QtbError(
                f"backup qube '{cfg.backup_qube}' is not running: qvm-start {cfg.backup_qube}", EXIT_QUBE
            )
        qubes.start_qube(cfg.backup_qube)
    selection = select_qubes(cfg, all_qubes, names, exclude)
    if not selection.included:
        raise QtbError("nothing to back up: every qube is left out (see qtb-pipe config check)", EXIT_USAGE)
    adapter = Adapter(cfg.backup_qube, cfg.engine, cfg.adapter_command)
    adapter.snapshots()  # preflight: adapter present, repository ready, password right
    cleanup_stale_runs()

    run = Run()
    passphrase_file = run.create(secret)
    started = time.monotonic()
    progress = Progress("backup", enabled=not as_json)
    try:
        info(
            f"qtb-pipe: backing up {', '.join(selection.included)} to {cfg.engine} in '{cfg.backup_qube}'",
            as_json,
        )
        res = qubes.qvm_backup(
            cfg.backup_qube,
            adapter.store_location(run.run_id),
            str(passphrase_file),
            selection.included,
            progress.update,
        )
        progress.done()
        if res.code != 0:
            raise QtbError(
                f"qvm-backup failed: {qubes.one_line(res.stderr, 'no message')}; nothing was committed",
                EXIT_FAILED,
            )
        stored = adapter.pending_members(run.run_id)
        backup_id = check_run(run.records(), stored)
        manifest = {
            "format": shim.MANIFEST_FORMAT,
            "backup_id": backup_id,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "engine": cfg.engine,
            "qubes": selection.included,
            # where each qube's files are in the stream, for per-qube verify reports
            "paths": {
                name: ("dom0-home/" if name == "dom0" else f"vm{all_qubes[name].qid}/")
                for name in selection.included
            },
            "chunks": [
                {"path": r.path, "size": r.size, "tag": r.tag} for r in run.records() if r.op == "enc"
            ],
        }
        sealed = shim.seal_manifest(bytes.fromhex(secret), manifest)
        committed = adapter.commit(run.run_id, sealed)
    except BaseException:
        progress.done()
        raise
    finally:
        run.remove()
    elapsed = time.monotonic() - started
    stream_bytes = sum(m.size for m in stored)
    snapshot_id = committed["id"]
    save_record(
        SnapshotRecord(
            id=snapshot_id,
            engine=cfg.engine,
            backup_id=backup_id,
            time=manifest["created"],
            qubes=selection.included,
            stream_bytes=stream_bytes,
            manifest_sha256=hashlib.sha256(sealed).hexdigest(),
        )
    )
    added = committed.get("added_bytes") if isinstance(committed.get("added_bytes"), int) else None
    summary = {
        "snapshot": snapshot_id,
        "engine": cfg.engine,
        "backup_id": backup_id,
        "qubes": selection.included,
        "stream_bytes": stream_bytes,
        "added_bytes": added,
        "seconds": round(elapsed, 2),
        "throughput_bytes_per_s": int(stream_bytes / elapsed) if elapsed > 0 else None,
        "warnings": [],
    }
    warning = qubes_xml_warning(stored)
    if warning:
        summary["warnings"].append(warning)
    for warning in summary["warnings"]:
        info(f"warning: {warning}", as_json)
    if not as_json:
        print(
            f"snapshot {snapshot_id} ({cfg.engine}) complete: {len(selection.included)} qubes, "
            f"{human_bytes(stream_bytes)} streamed, {human_bytes(added)} added to the repository, "
            f"{human_duration(elapsed)} ({human_bytes(summary['throughput_bytes_per_s'])}/s)"
        )
    return summary
