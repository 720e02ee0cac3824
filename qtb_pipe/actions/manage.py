"""`qtb-pipe list`, `prune` and `check`: the repository as the adapter reports it, joined with
what dom0 itself recorded at commit time."""

from __future__ import annotations

from ..adapter import Adapter
from ..config import RETENTION_KEYS, Config, forget_record, load_records
from ..errors import EXIT_USAGE, QtbError
from ..ui import human_bytes


def run_list(cfg: Config) -> list[dict]:
    adapter = Adapter(cfg.backup_qube, cfg.engine, cfg.adapter_command)
    records = load_records()
    rows = []
    for snap in adapter.snapshots():
        rec = records.get((cfg.engine, snap.id))
        rows.append(
            {
                "id": snap.id,
                "engine": cfg.engine,
                "time": snap.time,
                "state": snap.state,
                "backup_id": snap.backup_id,
                "qubes": snap.qubes,
                "stream_bytes": snap.stream_bytes,
                "added_bytes": snap.added_bytes,
                "dom0_record": rec is not None,
                # a snapshot whose id dom0 recorded with another backup is a warning sign
                "matches_dom0_record": rec is None or rec.backup_id == snap.backup_id,
            }
        )
    return rows


def print_list(rows: list[dict]) -> None:
    if not rows:
        print("no snapshots yet: run qtb-pipe backup")
        return
    print(f"{'snapshot':<20} {'time':<26} {'state':<9} {'stream':>10} {'added':>10}  dom0  qubes")
    for r in rows:
        mark = (
            "yes" if r["dom0_record"] and r["matches_dom0_record"] else ("BAD" if r["dom0_record"] else "no")
        )
        print(
            f"{r['id']:<20} {r['time']:<26} {r['state']:<9} {human_bytes(r['stream_bytes']):>10} "
            f"{human_bytes(r['added_bytes']):>10}  {mark:<5} {', '.join(r['qubes'])}"
        )


def run_prune(cfg: Config, overrides: dict[str, int | None], dry_run: bool) -> dict:
    retention = {**cfg.retention, **{k: v for k, v in overrides.items() if v is not None}}
    retention = {k: v for k, v in retention.items() if v}
    if not retention:
        raise QtbError(
            f"no retention rule: set one of {', '.join(RETENTION_KEYS)} in the config or as flags", EXIT_USAGE
        )
    adapter = Adapter(cfg.backup_qube, cfg.engine, cfg.adapter_command)
    before = {s.id for s in adapter.snapshots() if s.state == "complete"}
    result = adapter.prune(retention, dry_run)
    if not dry_run:
        after = {s.id for s in adapter.snapshots() if s.state == "complete"}
        for gone in before - after:
            forget_record(cfg.engine, gone)
        removed = sorted(before - after)
    else:
        removed = sorted(result.get("remove", [])) if isinstance(result, dict) else []
    return {
        "retention": retention,
        "removed": removed,
        "kept": sorted(before - set(removed)),
        "dry_run": dry_run,
    }


def run_check(cfg: Config, read_data_subset: str | None) -> dict:
    result = Adapter(cfg.backup_qube, cfg.engine, cfg.adapter_command).check(read_data_subset)
    return {"engine": cfg.engine, "ok": True, "adapter": result}
