"""A typical night (issue 10): the benchmark world backed up once, then a day on which two of its
qubes ran; the nightly run against a --full run of the same state, one small qube restored from its
own copy against from a whole-system run, and `restore --all` against restoring that one run.

Ratios in one run, no timed assertions. The "whole-system run" is what qtb-pipe did before the
per-qube history: every qube in one qvm-backup, one snapshot; it is made here with the driver's own
`backup_unit`, so both sides use the same code but for the split.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.run import BIN, ENGINE_PW, du, md_section, sim

CHANGED = ("work", "vault")  # the qubes that "ran" during the day
SMALL = "vault"  # the small qube restored on its own
# The night again on a system of 30 qubes backed up: the benchmark world's five and 25 AppVMs like
# personal (qubes-sim init --appvms). A full run is then 30 units, the night still 3.
MORE_APPVMS = 25

WHOLE_SYSTEM_UNIT = """
import json, sys
from qtb_pipe import qubes
from qtb_pipe.actions.backup import backup_unit, qube_entries, select_qubes
from qtb_pipe.adapter import Adapter
from qtb_pipe.config import load_config, load_secret
from qtb_pipe.ui import Progress
cfg = load_config(); cfg.engine = sys.argv[1]
everything = qubes.list_qubes()
names = select_qubes(cfg, everything, [], []).included
unit = backup_unit(cfg, Adapter(cfg.backup_qube, cfg.engine), load_secret(), qube_entries(everything, names),
                   dict.fromkeys(names), Progress("backup", names, as_json=True))  # silent
print(json.dumps({"snapshot": unit["snapshot"], "stream_bytes": unit["stream_bytes"]}))
"""


class Night:
    def __init__(
        self,
        work: Path,
        size_mib: float,
        env: dict,
        pool: str = "vm-pool",
        engines=("restic", "borg"),
        appvms: int = 0,
    ) -> None:
        self.world, self.env = work / "world", env
        sim("init", str(self.world), "--size-mib", str(size_mib), "--seed", "5", "--pool", pool,
            "--appvms", str(appvms))  # fmt: skip
        home = self.world / "qubes/backup/home/user"
        (home / "pw").write_text(ENGINE_PW + "\n")
        self.run("qtb-pipe", "init", "--backup-qube", "backup")
        self.run("qtb-pipe", "install-shim")
        for engine in engines:
            self.run(
                "qtb-adapter", "init", "--engine", engine, "--repo", str(home / f"repo-{engine}"),
                "--password-file", str(home / "pw"), inside="backup",
            )  # fmt: skip
        self.home = home

    def run(self, *cmd: str, inside: str | None = None) -> tuple[float, bytes]:
        argv = [
            str(BIN / "qubes-sim"),
            "run",
            str(self.world),
            *(["--in", inside] if inside else []),
            "--",
            *cmd,
        ]
        start = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, env=self.env)
        if proc.returncode != 0:
            raise SystemExit(
                f"night: {' '.join(cmd[:6])} failed: {proc.stderr.decode(errors='replace')[-500:]}"
            )
        return time.monotonic() - start, proc.stdout

    def timed_json(self, *cmd: str) -> tuple[float, dict]:
        seconds, out = self.run(*cmd, "--json")
        return seconds, json.loads(out)

    def volume_bytes(self, qube: str) -> int:
        return sum(f.stat().st_size for f in self.world.glob(f"dom0/var/lib/qubes/*/{qube}/*.img"))


def count_dumps(night: Night) -> Path:
    """Put benchmarks/counting_adapter.py in front of the backup qube's adapter; returns its log."""
    wrapper = night.world / "qubes/backup/usr/local/bin/qtb-adapter"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(
        f'#!/bin/sh\nexec {sys.executable} {Path(__file__).parent / "counting_adapter.py"} "$@"\n'
    )
    wrapper.chmod(0o755)
    return night.home / "dump-bytes.log"


def served(log: Path) -> int:
    """Bytes the dumps since the last call served (measured in the backup qube), then a fresh log."""
    total = sum(int(line) for line in log.read_text().split()) if log.exists() else 0
    log.unlink(missing_ok=True)
    return total


def typical_night(work: Path, size_mib: float, env: dict, appvms: int = 0) -> dict:
    """Each engine in a world of its own: the restores below add qubes (vault-1, work-1…), which
    the next engine's nights would otherwise back up too. With `appvms`, the world has that many
    more qubes and only the backups are measured (the restores are the 5-qube world's)."""
    results: dict = {}
    for engine in ("restic", "borg"):
        night = Night(work / engine, size_mib, env, engines=(engine,), appvms=appvms)
        repo = night.home / f"repo-{engine}"
        r: dict = {}
        if not appvms:  # the whole-system run first: the per-qube copies made after it are each qube's newest
            seconds, out = night.run("python", "-c", WHOLE_SYSTEM_UNIT, engine)
            whole = json.loads(out)
            r["whole_system_backup_seconds"] = round(seconds, 1)
        _, first = night.timed_json("qtb-pipe", "backup", "--full", "--engine", engine)
        sim("mutate", str(night.world), *CHANGED, "--percent", "2", "--seed", "31")  # same change for both
        before = du(repo)
        seconds, nightly = night.timed_json("qtb-pipe", "backup", "--engine", engine)
        r["nightly"] = {
            "seconds": round(seconds, 1),
            "backed_up": [q for q, v in nightly["qubes"].items() if v["status"] == "backed up"],
            "bytes_read": nightly["stream_bytes"],
            "repository_growth": du(repo) - before,
        }
        # what a night must read: the changed qubes' volumes, and dom0's home (always backed up)
        changed_volumes = sum(night.volume_bytes(q) for q in CHANGED) + du(night.world / "dom0/home")
        seconds, full = night.timed_json("qtb-pipe", "backup", "--full", "--engine", engine)
        r["full_same_state"] = {
            "seconds": round(seconds, 1),
            "bytes_read": full["stream_bytes"],
            "units": len(full["snapshots"]),
        }
        r["changed_qubes_volume_bytes"] = changed_volumes
        r["nightly_bytes_vs_changed_volumes"] = round(nightly["stream_bytes"] / changed_volumes, 3)
        # wall clock, as the user waits for it: the run's own `seconds` leave out the fingerprints
        # and the preflight, which are what the split adds
        r["full_vs_nightly_seconds"] = round(
            r["full_same_state"]["seconds"] / max(r["nightly"]["seconds"], 0.01), 2
        )
        r["full_vs_nightly_run_seconds"] = round(full["seconds"] / max(nightly["seconds"], 0.01), 2)
        # the most the split can win here even with no fixed cost at all: the night must stream the
        # changed qubes and dom0's home, and time cannot fall faster than the bytes
        r["full_vs_nightly_bytes"] = round(full["stream_bytes"] / max(nightly["stream_bytes"], 1), 2)
        if not appvms:
            restores(night, engine, full, whole, r)
        # fixed cost of one committed unit: the small qube alone is almost nothing else (an upper bound:
        # it includes the run's own start, the preflight listing and the fingerprints)
        seconds, _ = night.timed_json("qtb-pipe", "backup", "--full", "--engine", engine, SMALL)
        r["fixed_cost_per_unit_seconds"] = round(seconds, 1)
        r["fixed_cost_for_30_qubes_seconds"] = round(30 * seconds, 0)
        r["first_full_seconds"] = first["seconds"]
        results[engine] = r
    return results


def restores(night: Night, engine: str, full: dict, whole: dict, r: dict) -> None:
    """One small qube back from its own copy and from the whole-system run; restore --all against
    restoring that one run."""
    own = full["qubes"][SMALL]
    # (dom0's home stays out: a restored copy of it would be in the next engine's backups)
    restore = [
        "qtb-pipe",
        "restore",
        "--engine",
        engine,
        "--rename-conflicting",
        "--single-pass",
        "--skip-dom0-home",
    ]
    log = count_dumps(night)
    seconds, _ = night.run(*restore, "--qube", SMALL)
    r["restore_small_own_copy"] = {
        "seconds": round(seconds, 1),
        "bytes_read": served(log),
        "own_stream_bytes": own["stream_bytes"],
    }
    seconds, _ = night.run(*restore, whole["snapshot"], SMALL)
    r["restore_small_whole_system"] = {"seconds": round(seconds, 1), "bytes_read": served(log)}
    (night.world / "qubes/backup/usr/local/bin/qtb-adapter").unlink()  # the timings below without it
    seconds, _ = night.run(*restore, "--all")
    r["restore_all_seconds"] = round(seconds, 1)
    seconds, _ = night.run(*restore, whole["snapshot"])
    r["restore_whole_system_run_seconds"] = round(seconds, 1)


def night_markdown(results: dict, larger: dict | None = None) -> list[str]:
    """The night's table; `larger` (the same night on 30 qubes) adds rows with the backups only."""
    lines = md_section(
        "A typical night (issue 10)",
        f"After a full backup, {' and '.join(CHANGED)} ran during the day (2% of their volumes changed); "
        "'changed volumes' counts dom0's home too, which every night backs up. Bytes ratio: --full's "
        "stream over the night's, the speed-up the split could reach with no fixed cost per unit. Units: "
        "the qvm-backup runs (one per qube) of --full. The second pair of rows: the same world with "
        f"{MORE_APPVMS} more AppVMs like personal (qubes-sim init --appvms; 2 in the smoke run), the same "
        "MiB of volumes in all, backups only. Restore MiB: what the "
        "backup qube's dumps served into the pipe, measured there (benchmarks/counting_adapter.py; its "
        "copy adds a process start to each adapter call of those two restores).",
        "| engine | units | nightly s | --full s | speed-up | bytes ratio (ceiling) | backed up | "
        "bytes read / changed volumes | growth | "
        f"restore {SMALL}: own copy s, MiB | from whole run s, MiB | restore --all s | whole run s | "
        "s per unit (x30) |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    )
    rows = [*results.items(), *(larger or {}).items()]
    for engine, r in rows:
        if "restore_small_own_copy" in r:
            own, whole = r["restore_small_own_copy"], r["restore_small_whole_system"]
            restored = (
                f"{own['seconds']}, {own['bytes_read'] / 2**20:.0f} | "
                f"{whole['seconds']}, {whole['bytes_read'] / 2**20:.0f} | "
                f"{r['restore_all_seconds']} | {r['restore_whole_system_run_seconds']}"
            )
        else:
            restored = "– | – | – | –"
        lines.append(
            f"| {engine} | {r['full_same_state'].get('units', '?')} | {r['nightly']['seconds']} | "
            f"{r['full_same_state']['seconds']} | "
            f"{r['full_vs_nightly_seconds']}x | {r['full_vs_nightly_bytes']}x | "
            f"{', '.join(r['nightly']['backed_up'])} | "
            f"{r['nightly_bytes_vs_changed_volumes']} | {r['nightly']['repository_growth'] / 2**20:.1f} MiB "
            f"| {restored} | "
            f"{r['fixed_cost_per_unit_seconds']} ({r['fixed_cost_for_30_qubes_seconds']:.0f}) |"
        )
    return lines
