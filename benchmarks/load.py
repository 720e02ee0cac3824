"""Many nights in a row (issue 14, "Also"): a small world backed up once, then every night one qube
ran and changed a little; then prune with the default retention, check, verify every qube's newest
copy and restore one qube next to itself. Reports how backup, list, prune and restore times and the
dom0/adapter state sizes grow with the number of snapshots (they must not grow faster than
linearly). `tests/test_load.py` (slow tier) runs the same function and checks what it did.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from benchmarks.night import Night
from benchmarks.run import BIN, du, md_section, sim

RAN = ("work", "vault", "personal")  # one of them runs each day, in turn


def digest(world: Path, qube: str, restored_home: bool = False) -> dict:
    """A qube's files, or (dom0) its home's: the original, or the newest restore of it."""
    argv = [str(BIN / "qubes-sim"), "digest", str(world), qube, "--json"]
    out = json.loads(
        subprocess.run(argv + ["--restored-home"] * restored_home, check=True, capture_output=True).stdout
    )
    return out["dom0-home"] if qube == "dom0" else out["qubes"][qube]["files"]


def many_nights(work: Path, env: dict, engine: str, nights: int = 30, size_mib: float = 16) -> dict:
    night = Night(work, size_mib, env, engines=(engine,))
    world, repo = night.world, night.home / f"repo-{engine}"
    _, first = night.timed_json("qtb-pipe", "backup", "--engine", engine)
    rows = []
    for number in range(nights):
        qube = RAN[number % len(RAN)]
        sim("mutate", str(world), qube, "--percent", "1", "--seed", str(100 + number))
        backup_s, done = night.timed_json("qtb-pipe", "backup", "--engine", engine)
        list_s, listed = night.timed_json("qtb-pipe", "list", "--engine", engine)
        prune_s, _ = night.timed_json("qtb-pipe", "prune", "--engine", engine, "--dry-run")
        # a test restore of the copy just made of the qube that ran, through the stock path: what
        # restore does, less creating the qube
        copy = done["qubes"][qube]["snapshot"]
        verify_s, _ = night.timed_json("qtb-pipe", "verify", "--engine", engine, copy)
        rows.append({
            "night": number + 1,
            "ran": qube,
            "backed_up": sorted(q for q, r in done["qubes"].items() if r["status"] == "backed up"),
            "backup_seconds": round(backup_s, 2),
            "list_seconds": round(list_s, 2),
            "prune_dry_run_seconds": round(prune_s, 2),
            "verify_night_seconds": round(verify_s, 2),
            "snapshots": len(listed["snapshots"]),
            "dom0_state_bytes": du(world / "dom0/var/lib/qtb-pipe"),
            "adapter_state_bytes": du(night.home / ".local/state/qtb-pipe"),
            "repository_bytes": du(repo),
        })  # fmt: skip
    prune_s, pruned = night.timed_json("qtb-pipe", "prune", "--engine", engine)
    check_s, _ = night.timed_json("qtb-pipe", "check", "--engine", engine)
    verify_s, verified = night.timed_json("qtb-pipe", "verify", "--engine", engine)
    # every kept snapshot (after the prune: each qube's newest copy) restored next to the original
    restore = ["qtb-pipe", "restore", "--engine", engine, "--all", "--rename-conflicting", "--single-pass"]
    restore_s, restored = night.timed_json(*restore)
    _, after = night.timed_json("qtb-pipe", "list", "--engine", engine)
    return {
        "engine": engine,
        "first_backup": {"seconds": first["seconds"], "qubes": sorted(first["qubes"])},
        "nights": rows,
        "prune": {
            "seconds": round(prune_s, 2),
            "removed": len(pruned["removed"]),
            "kept": len(pruned["kept"]),
        },
        "check_seconds": round(check_s, 2),
        "verify": {
            "seconds": round(verify_s, 2),
            "qubes": {q: v["ok"] for q, v in verified["qubes"].items()},
        },
        "restore_every_qube": {
            "seconds": round(restore_s, 2),
            "snapshots": len(restored["snapshots"]),
            "ok": all(q["ok"] for q in restored["qubes"].values()),
            "identical": {  # qvm-backup-restore's --rename-conflicting names: NAME-1
                q: digest(world, "dom0" if q == "dom0" else f"{q}-1", q == "dom0") == digest(world, q)
                for q in restored["qubes"]
            },
        },
        "after_prune": {"snapshots": len(after["snapshots"])},
    }


def growth(rows: list[dict], key: str, span: int = 5) -> float | None:
    """The mean of the last `span` nights over the first `span`: 1 is flat, ~N is linear."""
    if len(rows) < 2 * span:
        return None
    head = sum(r[key] for r in rows[:span]) / span
    tail = sum(r[key] for r in rows[-span:]) / span
    return round(tail / head, 2) if head else None


def load_markdown(results: dict) -> list[str]:
    lines = md_section(
        "Many nights in a row (issue 14)",
        "One qube ran each night (1% changed), then `qtb-pipe backup`, `list`, `prune --dry-run` and "
        "`verify` of the copy just made of the qube that ran (a test restore); growth = mean of "
        "the last 5 nights over the first 5 (1 = flat). Then prune (default retention), check, verify, "
        "and `restore --all` of what was kept (each qube's newest copy), every qube compared with its "
        "original.",
        "| engine | nights | snapshots | backup s first→last "
        "| growth: backup, list, prune --dry-run, verify of the night, dom0 state, adapter state "
        "| prune s (removed) | verify s "
        "| restore --all s (snapshots, all identical) |",
        "|---|---:|---:|---|---|---|---:|---|",
    )
    for r in results.values():
        rows = r["nights"]
        lines.append(
            f"| {r['engine']} | {len(rows)} | {rows[-1]['snapshots']} | "
            f"{rows[0]['backup_seconds']}→{rows[-1]['backup_seconds']} | "
            + ", ".join(
                str(growth(rows, k))
                for k in (
                    "backup_seconds",
                    "list_seconds",
                    "prune_dry_run_seconds",
                    "verify_night_seconds",
                    "dom0_state_bytes",
                    "adapter_state_bytes",
                )
            )
            + f" | {r['prune']['seconds']} ({r['prune']['removed']}) | {r['verify']['seconds']} | "
            f"{r['restore_every_qube']['seconds']} ({r['restore_every_qube']['snapshots']}, "
            f"{all(r['restore_every_qube']['identical'].values())}) |"
        )
    return lines


def main() -> None:  # python -m benchmarks.load WORKDIR: the scenario alone, its JSON on stdout
    import argparse
    import os

    p = argparse.ArgumentParser()
    p.add_argument("work", type=Path)
    p.add_argument("--nights", type=int, default=30)
    args = p.parse_args()
    started = time.monotonic()
    results = {e: many_nights(args.work / e, dict(os.environ), e, args.nights) for e in ("restic", "borg")}
    print(json.dumps({"seconds": round(time.monotonic() - started, 1), "results": results}, indent=2))


if __name__ == "__main__":
    main()
