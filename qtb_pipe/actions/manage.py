"""`qtb-pipe list`, `prune` and `check`: dom0's per-qube catalog, with the repository as the adapter
reports it (a snapshot dom0 has no record of is shown, never trusted)."""

from __future__ import annotations

import datetime
from dataclasses import asdict

from .. import qubes
from ..adapter import Adapter
from ..config import RETENTION_KEYS, Config
from ..errors import EXIT_USAGE, QtbError
from ..records import begin_prune, catalog, end_prune, load_records
from ..ui import human_bytes, human_duration, short_id


def run_list(cfg: Config, qube: str | None = None) -> dict:
    adapter = Adapter(cfg.backup_qube, cfg.engine, cfg.adapter_command)
    records = load_records()
    listed = adapter.snapshots()
    present = {s.snapshot for s in listed if s.state == "complete"}
    rows = []
    for snap in listed:
        rec = records.get((cfg.engine, snap.snapshot))
        # a snapshot whose id dom0 recorded with another backup is a warning sign
        mark = "not recorded" if rec is None else "yes" if rec.backup_id == snap.backup_id else "BAD"
        rows.append({**asdict(snap), "engine": cfg.engine, "dom0_record": mark})
    copies = catalog(cfg.engine)
    if qube is not None and qube not in copies:
        raise QtbError(f"dom0 has no copy of {qube} in {cfg.engine} (see qtb-pipe list)", EXIT_USAGE)
    now = datetime.datetime.now(datetime.UTC)
    per_qube = {}
    for name, recs in copies.items() if qube is None else [(qube, copies[qube])]:
        newest = recs[-1]
        per_qube[name] = {
            "snapshot": newest.id,
            "time": newest.time,
            "age_seconds": int((now - datetime.datetime.fromisoformat(newest.time)).total_seconds()),
            "copies": len(recs),
            "in_repository": newest.id in present,
        }
        if name == qube:
            per_qube[name]["history"] = [
                {"snapshot": r.id, "time": r.time, "backup_id": r.backup_id, "fingerprint": r.qubes[name]}
                | {"manifest_sha256": r.manifest_sha256, "in_repository": r.id in present}
                for r in reversed(recs)
            ]
    rows = [r for r in rows if qube in (None, *r["qube_names"])]  # with --qube, those that hold it
    return {"engine": cfg.engine, "qubes": per_qube, "snapshots": rows}


def print_list(result: dict) -> None:
    if not result["qubes"] and not result["snapshots"]:
        print("no snapshots yet: run qtb-pipe backup")
        return
    ids = [q["snapshot"] for q in result["qubes"].values()] + [r["snapshot"] for r in result["snapshots"]]
    w = max([14, *(len(short_id(i)) for i in ids)])  # borg's archive names are long
    print(f"{'qube':<24} {'latest copy':<{w}} {'age':>8} {'copies':>6}")
    for name, q in sorted(result["qubes"].items()):
        gone = "" if q["in_repository"] else "  (not in the repository!)"
        age = human_duration(q["age_seconds"])
        print(f"{name:<24} {short_id(q['snapshot']):<{w}} {age:>8} {q['copies']:>6}{gone}")
        for h in q.get("history", []):
            print(f"    {short_id(h['snapshot']):<{w}} {h['time']}{'' if h['in_repository'] else '  (gone)'}")
    print(f"\n{'snapshot':<{w}} {'time':<26} {'state':<9} {'stream':>10} {'added':>10}  {'dom0':<12} qubes")
    for r in result["snapshots"]:
        print(
            f"{short_id(r['snapshot']):<{w}} {r['time']:<26} {r['state']:<9} "
            f"{human_bytes(r['stream_bytes']):>10} {human_bytes(r['added_bytes']):>10}  "
            f"{r['dom0_record']:<12} {', '.join(r['qube_names'])}"
        )


def run_prune(cfg: Config, overrides: dict[str, int | None], dry_run: bool) -> dict:
    """Retention per qube, in the backup qube; dom0 protects the newest copy of every qube that still
    exists, and forgets the records of snapshots that are gone."""
    retention = {**cfg.retention, **{k: v for k, v in overrides.items() if v is not None}}
    retention = {k: v for k, v in retention.items() if v}
    if not retention:
        raise QtbError(
            f"no retention rule: set one of {', '.join(RETENTION_KEYS)} in the config or as flags", EXIT_USAGE
        )
    existing = set(qubes.list_qubes())
    adapter = Adapter(cfg.backup_qube, cfg.engine, cfg.adapter_command)
    before = {s.snapshot for s in adapter.complete()}
    noted = before if dry_run else begin_prune(cfg.engine, before)
    copies = catalog(cfg.engine)
    recorded = sorted({r.id for c in copies.values() for r in c})
    removed = set(adapter.prune(retention, dry_run, sorted(existing), recorded))
    if not dry_run:  # what is gone is what the listing no longer shows
        removed = end_prune(cfg.engine, noted, {s.snapshot for s in adapter.complete()})
    remaining = {
        name: {"remaining": [r.id for r in recs if r.id not in removed], "exists_in_dom0": name in existing}
        for name, recs in copies.items()
    }
    return {
        "retention": retention,
        "dry_run": dry_run,
        "removed": sorted(removed),
        "kept": sorted(before - removed),
        "qubes": remaining,
    }


def print_prune(result: dict) -> None:
    verb = "would remove" if result["dry_run"] else "removed"
    print(f"{verb} {len(result['removed'])} snapshot(s), kept {len(result['kept'])}")
    for snapshot in result["removed"]:
        print(f"  {verb}: {snapshot}")
    for name, q in sorted(result["qubes"].items()):
        note = "" if q["exists_in_dom0"] else "  (deleted from dom0: its copies age out by the rules)"
        print(
            f"  {name:<24} {len(q['remaining'])} cop{'y' if len(q['remaining']) == 1 else 'ies'} left{note}"
        )


def run_check(cfg: Config, read_data_subset: str | None) -> dict:
    passed, output, warnings = Adapter(cfg.backup_qube, cfg.engine, cfg.adapter_command).check(
        read_data_subset
    )
    if not passed:
        raise QtbError(
            f"the {cfg.engine} repository check did not pass (qtb-adapter check in the backup qube)"
        )
    return {"engine": cfg.engine, "ok": True, "read_data_subset": read_data_subset, "output": output,
            "warnings": warnings}  # fmt: skip
