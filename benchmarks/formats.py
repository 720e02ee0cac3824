"""The two inner formats of a Qubes backup (issue 13.5), side by side in one run.

A volume in an LVM thin pool (the default install) is exported as a block device and written by
`qubes.tarwriter`: pax GNU sparse 1.0 with the writer's pid in the member name, so every run's
first block of every volume differs. Volumes in file and file-reflink pools go through GNU
`tar --sparse` (no pid). The same world in each kind of pool, each engine's default settings:
a full backup, an unchanged re-run (`--full`: every qube again) and a re-run after 2% changed
(`--full`, so that both formats store the same qubes). Growth is the repository's, on disk.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.night import Night
from benchmarks.run import du, md_section, sim

POOLS = {"lvm_thin (qubes.tarwriter)": "vm-pool", "file (GNU tar)": "varlibqubes"}


def inner_formats(work: Path, size_mib: float, env: dict) -> dict:
    results: dict = {}
    for label, pool in POOLS.items():
        night = Night(work / pool, size_mib, env, pool=pool)
        for engine in ("restic", "borg"):
            repo = night.home / f"repo-{engine}"
            row: dict = {}
            for step in ("full", "unchanged", "changed 2%"):
                if step == "changed 2%":
                    sim("mutate", str(night.world), "--percent", "2", "--seed", "41")
                before = du(repo)
                seconds, done = night.timed_json("qtb-pipe", "backup", "--full", "--engine", engine)
                growth = du(repo) - before
                row[step] = {
                    "seconds": round(seconds, 1),
                    "stream_bytes": done["stream_bytes"],
                    "growth_bytes": growth,
                    "growth_percent": round(100 * growth / max(done["stream_bytes"], 1), 3),
                    "units": len(done["snapshots"]),
                }
            results.setdefault(label, {})[engine] = row
    return results


def formats_markdown(results: dict) -> list[str]:
    lines = md_section(
        "Inner formats (issue 13.5)",
        "The same world with its volumes in an LVM thin pool (qubes.tarwriter) and in a file pool "
        "(GNU tar); every run backs up every qube (`--full`). Growth of the repository as % of the stream.",
        "| pool (inner format) | engine | full: stream MiB | unchanged re-run | after 2% changed | units |",
        "|---|---|---:|---:|---:|---:|",
    )

    def growth(step: dict) -> str:
        return f"+{step['growth_bytes'] / 2**20:.2f} MiB ({step['growth_percent']}%)"

    for label, engines in results.items():
        for engine, row in engines.items():
            lines.append(
                f"| {label} | {engine} | {row['full']['stream_bytes'] / 2**20:.0f} | "
                f"{growth(row['unchanged'])} | {growth(row['changed 2%'])} | {row['full']['units']} |"
            )
    return lines
