"""Volumes as qubesd's storage pools keep them: revisions on commit, `qvm-volume` and `qvm-pool`.

From QubesOS/qubes-core-admin 1ad5f9b (`qubes/storage/lvm.py`, `reflink.py`, `file.py`,
`__init__.py`) and qubes-core-admin-client 02bc30a (`qubesadmin/tools/qvm_volume.py`,
`qvm_pool.py`), see the facts file §8 and docs/qubes-facts.md. A volume's committed state changes
only on a commit: when its qube stops after running, on import and, on file-reflink, on revert.
  - lvm_thin: each commit keeps the old state as revision `<unix time>-back`, newest
    `revisions_to_keep` kept; revert replaces the data and leaves the list as it is.
  - file-reflink: a commit adds revision N+1 (N the newest, 1 when there is none); revert adds one
    and drops the one reverted to.
  - file: at most one revision, always called `old`.
  - revisions_to_keep = 0: no revision is kept on any pool.
The state lives in world.json ("pools", "volumes"); the data stays in the qube's <vol>.img.
Emulator's own choice: two commits of one LVM volume in the same second get ids one second apart
(real lvm would name both after that second; the tests commit faster than once a second). And
`qvm-pool info`'s `size` and `usage` rows are those of the file system of dom0's /var/lib/qubes,
where every volume's image is, one for every pool (real ones are each pool's own: the thin pool's
data, a file pool's directory). A restore makes new volumes in qubes-prefs' default pool (facts V8).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .world import SimError, World

POOLS = {
    "vm-pool": {
        "driver": "lvm_thin",
        "revisions_to_keep": 1,
        "volume_group": "qubes_dom0",
        "thin_pool": "vm-pool",
    },
    "varlibqubes": {"driver": "file", "revisions_to_keep": 1, "dir_path": "/var/lib/qubes"},
    "reflink": {"driver": "file-reflink", "revisions_to_keep": 1, "dir_path": "/var/lib/qubes-reflink"},
}
SAVED_VOLUMES = {
    "TemplateVM": ("root", "private"),
    "StandaloneVM": ("root", "private"),
    "AppVM": ("private",),
}
INFO_KEYS = (
    "pool",
    "vid",
    "rw",
    "source",
    "save_on_stop",
    "snap_on_start",
    "size",
    "usage",
    "revisions_to_keep",
)


@dataclass
class Volume:
    qube: str
    name: str
    state: dict  # world.json's entry: pool, vid, revisions_to_keep, revisions, last_time (a copy)

    @property
    def key(self) -> str:
        return f"{self.qube}:{self.name}"

    @property
    def driver(self) -> str:
        return POOLS[self.state["pool"]]["driver"]


def init_volumes(world: World, qube: str, klass: str, pool: str) -> None:
    """New volumes of a new qube, as qvm-create (or a restore) makes them: no revision yet."""
    with world.transaction() as state:
        for name in SAVED_VOLUMES.get(klass, ()):
            lvm = POOLS[pool]["driver"] == "lvm_thin"
            state.setdefault("volumes", {})[f"{qube}:{name}"] = {
                "pool": pool,
                "vid": f"qubes_dom0/vm-{qube}-{name}" if lvm else f"appvms/{qube}/{name}",
                "revisions_to_keep": POOLS[pool]["revisions_to_keep"],
                "revisions": [],
                "last_time": 0,
            }


def volumes_of(world: World, qube: str) -> list[Volume]:
    return [
        Volume(qube, key.split(":")[1], dict(s))
        for key, s in world.state.get("volumes", {}).items()
        if key.split(":")[0] == qube
    ]


def commit(world: World, volume: Volume) -> None:
    """The volume's current data becomes its committed state; the old one may stay as a revision."""
    with world.transaction() as state:
        entry = state["volumes"][volume.key]
        keep = entry["revisions_to_keep"]
        if volume.driver == "lvm_thin":
            entry["last_time"] = max(int(time.time()), entry["last_time"] + 1)
            entry["revisions"].append(f"{entry['last_time']}-back")
        elif volume.driver == "file-reflink":
            entry["revisions"].append(str(int(entry["revisions"][-1]) + 1 if entry["revisions"] else 1))
        else:
            entry["revisions"] = ["old"]
        entry["revisions"] = entry["revisions"][-keep:] if keep > 0 else []
        volume.state = dict(entry)


def on_stop(world: World, qube: str) -> None:
    """A qube that ran stops: every save_on_stop volume commits (lvm `_commit`, reflink `stop`)."""
    for volume in volumes_of(world, qube):
        commit(world, volume)


def _volume(world: World, spec: str) -> Volume:
    """QUBE:VOLUME as qvm-volume resolves it (qubesadmin/tools/__init__.py VMVolumeAction)."""
    qube, colon, name = spec.partition(":")
    if not colon or ":" in name:
        raise SimError("expected a vm & volume combination like foo:bar", 2)
    if qube not in world.load_qubes():
        raise SimError(f"no vm '{qube}'", 1)
    found = [v for v in volumes_of(world, qube) if v.name == name]
    if not found:
        raise SimError(f"vm '{qube}' has no volume '{name}'", 1)
    return found[0]


def _info(world: World, volume: Volume) -> dict[str, str]:
    image = world.get_qube(volume.qube).vm_dir(world) / f"{volume.name}.img"
    st = image.stat() if image.exists() else None
    return {
        "pool": volume.state["pool"],
        "vid": volume.state["vid"],
        "rw": "True",
        "source": "",
        "save_on_stop": "True",
        "snap_on_start": "False",
        "size": str(st.st_size if st else 0),
        "usage": str(st.st_blocks * 512 if st else 0),
        "revisions_to_keep": str(volume.state["revisions_to_keep"]),
        "ephemeral": "False",
        "is_outdated": "False",
    }


def _table(rows: list[tuple[str, str]]) -> str:
    """qubesadmin.tools.print_table: `column -t`, the value column two spaces after the longest key."""
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v}" if v else k.ljust(width) for k, v in rows)


def qvm_volume(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qvm-volume")
    sub = p.add_subparsers(dest="action")
    s = sub.add_parser("info", aliases=["i"])
    s.add_argument("volume")
    s.add_argument("property", nargs="?")
    s = sub.add_parser("list", aliases=["ls", "l"])
    s.add_argument("vms", nargs="*")
    s = sub.add_parser("revert")
    s.add_argument("volume")
    s.add_argument("revision", nargs="?")
    s = sub.add_parser("resize")
    s.add_argument("volume")
    s.add_argument("size", type=int)
    s = sub.add_parser("import")
    s.add_argument("volume")
    s.add_argument("path")
    args = p.parse_args(argv)
    world = World.current()
    if args.action in ("list", "ls", "l", None):
        rows = [("POOL:VOLUME", "VMNAME", "VOLUME_NAME", "REVERT_POSSIBLE")]
        for name in args.vms or sorted(world.load_qubes()):
            for v in volumes_of(world, name):
                rows.append(
                    (
                        f"{v.state['pool']}:{v.state['vid']}",
                        name,
                        v.name,
                        "Yes" if v.state["revisions"] else "No",
                    )
                )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows))
        return 0
    volume = _volume(world, args.volume)
    if args.action in ("info", "i"):
        info = _info(world, volume)
        if args.property == "revisions":
            for revision in volume.state["revisions"]:
                print(revision)
        elif args.property is not None:
            if args.property not in info:
                print(f"Error: No such property: {args.property}", file=sys.stderr)
                return 1
            print(info[args.property])
        else:
            keep = info["revisions_to_keep"]
            rows = [(k, info[k]) for k in INFO_KEYS] + [
                ("ephemeral", info["ephemeral"]),
                ("is_outdated", "False"),
            ]
            rows[INFO_KEYS.index("revisions_to_keep")] = (
                "revisions_to_keep",
                keep + (" (snapshot disabled)" if keep == "-1" else ""),
            )
            print(_table(rows))
            if volume.state["revisions"]:
                print("List of available revisions (for revert):")
                print("\n".join(f"  {r}" for r in volume.state["revisions"]))
            else:
                print("List of available revisions (for revert): none")
        return 0
    if world.is_running(volume.qube):
        raise SimError(f"Error: Volume {volume.state['vid']} is currently in use", 1)
    image = world.get_qube(volume.qube).vm_dir(world) / f"{volume.name}.img"
    if args.action == "resize":  # a stopped volume grows in place: no revision (lvm/reflink `resize`)
        with open(image, "r+b") as f:
            f.truncate(max(args.size, image.stat().st_size))
    elif args.action == "import":
        image.write_bytes(Path(args.path).read_bytes())
        commit(world, volume)
    else:
        if not volume.state["revisions"]:
            raise SimError("Error: No snapshots available", 1)
        wanted = args.revision or volume.state["revisions"][-1]
        if wanted not in volume.state["revisions"]:
            raise SimError(f"Error: Revision {wanted} not found", 1)
        _revert_data(image)
        with world.transaction() as state:
            revisions = state["volumes"][volume.key]["revisions"]
            if (
                volume.driver == "file-reflink"
            ):  # keeps the current state as a new revision, drops the chosen one
                revisions.append(str(int(revisions[-1]) + 1))
                revisions.remove(wanted)
    return 0


def _revert_data(image: Path) -> None:
    """The emulator keeps no old data: a revert stands for "the data changed" (a byte flips)."""
    with open(image, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([(first[0] if first else 0) ^ 0xFF]))


def qvm_pool(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qvm-pool")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", aliases=["ls", "l"])
    s = sub.add_parser("info", aliases=["i"])
    s.add_argument("pools", nargs="+")
    args = p.parse_args(argv)
    if args.action in ("list", "ls", "l"):
        print(_table([("NAME", "DRIVER")] + [(name, c["driver"]) for name, c in POOLS.items()]))
        return 0
    rows: list[tuple[str, str]] = []
    for index, name in enumerate(args.pools):
        if name not in POOLS:
            raise SimError(f"no such pool: '{name}'", 2)
        rows += [("", "")] if index else []
        # qubesd's admin.pool.Info appends the pool's size and usage (facts V2), which the tool prints
        # among its settings; here the file system of dom0's /var/lib/qubes stands for every pool
        fs = os.statvfs(World.current().dom0 / "var/lib/qubes")
        usage = {"size": fs.f_blocks * fs.f_frsize, "usage": (fs.f_blocks - fs.f_bfree) * fs.f_frsize}
        rows += [("name", name)] + [(k, str(v)) for k, v in sorted({**POOLS[name], **usage}.items())]
    print(_table(rows))
    return 0
