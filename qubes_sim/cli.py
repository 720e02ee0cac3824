"""`qubes-sim`: create and drive an emulated Qubes OS world (dom0 + qubes) in one directory."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from pathlib import Path

from . import content, storage
from .world import Qube, SimError, World, real_scrypt, render_qubes_xml, write_tool_wrappers

MiB = 1024 * 1024
# name, class, template, netvm, include_in_backups, volume sizes (MiB) per profile "small"
LAYOUT = [
    ("debian-12", "TemplateVM", None, None, True, {"root": 6, "private": 1}),
    ("sys-net", "AppVM", "debian-12", "", False, {"private": 1}),
    ("work", "AppVM", "debian-12", "sys-net", True, {"private": 2}),
    ("personal", "AppVM", "debian-12", "sys-net", True, {"private": 1.5}),
    ("vault", "AppVM", "debian-12", "", True, {"private": 1}),
    ("backup", "AppVM", "debian-12", "sys-net", False, {"private": 1}),
]
PROFILES = {"small": 1.0, "demo": 32.0}  # scale factors: small ≈ 12.5 MiB of volumes, demo ≈ 400 MiB
HOME_FILES = {"small": (20, 16 * 1024), "demo": (60, 256 * 1024)}
LABEL_OF = {
    "debian-12": "black",
    "sys-net": "red",
    "work": "blue",
    "personal": "yellow",
    "vault": "black",
    "backup": "gray",
}
SOFTWARE = ("qtb-adapter", "restic")  # what the template "has installed", if present next to python


def layout_with(appvms: int) -> list[tuple]:
    """LAYOUT and `appvms` more AppVMs shaped like personal (app-1…): a system of more qubes, as the
    benchmarks' night on 30 qubes needs."""
    more = [(f"app-{i}", "AppVM", "debian-12", "sys-net", True, {"private": 1}) for i in range(1, appvms + 1)]
    return LAYOUT + more


def cmd_init(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve()
    if root.exists() and any(root.iterdir()):
        raise SimError(f"{root} exists and is not empty; choose a new directory", 2)
    full_layout = layout_with(args.appvms)
    base_total = sum(sum(v.values()) for *_, v in full_layout)
    scale = PROFILES[args.profile] if args.size_mib is None else args.size_mib / base_total
    dom0 = root / "dom0"
    for d in (
        "usr/bin",
        "usr/local/bin",
        "usr/sbin",
        "usr/local/sbin",
        "etc/qubes/backup",
        "var/lib/qubes",
        "var/log/qubes",
        "var/tmp",
        "root",
        f"home/{args.user}",
    ):
        (dom0 / d).mkdir(parents=True, exist_ok=True)
    os.symlink(real_scrypt(), dom0 / "usr/bin/scrypt")
    state = {
        "format": 1,
        "dom0_user": args.user,
        "seed": args.seed,
        "profile": args.profile,
        "default_pool": args.pool,  # qubes-prefs default_pool: where a restore puts new volumes
        "running": [] if args.bare else ["backup", "sys-net", "work"],
    }
    (root / "world.json").write_text(json.dumps(state, indent=2) + "\n")
    write_tool_wrappers(root)
    qubes = {"dom0": Qube(qid=0, name="dom0", klass="AdminVM", label="black")}
    layout = [x for x in full_layout if not args.bare or x[0] == "backup"]
    world = World(root)
    for qid, (name, klass, template, netvm, include, volumes) in enumerate(layout, start=1):
        q = Qube(
            qid=qid,
            name=name,
            klass=klass,
            label=LABEL_OF.get(name, "green"),
            template=template if not args.bare else None,
            netvm=netvm if not args.bare else "",
            include_in_backups=include,
            provides_network=name == "sys-net",
        )
        if args.bare:  # a fresh install has no template yet; keep the backup qube standalone
            q.klass = "StandaloneVM"
        qubes[name] = q
        _make_qube_fs(world, name)
        storage.init_volumes(world, name, q.klass, args.pool)
        if args.bare and name == "backup":
            volumes = {"root": 1, "private": 1}
        for i, (vol, mib) in enumerate(volumes.items()):
            size = max(64 * 1024, int(mib * scale * MiB) // 4096 * 4096)
            content.write_image(
                q.vm_dir(world) / f"{vol}.img",
                size,
                args.seed * 1000 + qid * 10 + i,
                "root" if vol == "root" else "private",
            )
        if netvm:
            (q.vm_dir(world) / "firewall.xml").write_text(
                '<?xml version="1.0"?>\n<firewall version="2">\n  <rules>\n'
                f'    <rule><properties><property name="action">accept</property></properties></rule>\n'
                f"  </rules>\n</firewall>\n<!-- {name} -->\n"
            )
        if name in ("work", "vault"):
            (q.vm_dir(world) / "notes.txt").write_text(f"Notes for {name}: keys are in the vault.\n")
    (dom0 / "var/lib/qubes/qubes.xml").write_bytes(render_qubes_xml(qubes))
    if not args.bare:
        count, max_size = HOME_FILES[args.profile]
        content.write_home_files(dom0 / f"home/{args.user}", args.seed, count, max_size)
    else:
        (dom0 / f"home/{args.user}/.bashrc").write_text("# fresh install\n")
    print(f"qubes-sim: world ready in {root} ({len(qubes) - 1} qubes, profile {args.profile})")
    return 0


def _make_qube_fs(world: World, name: str) -> None:
    qroot = world.qube_root(name)
    for d in ("home/user", "usr/bin", "usr/local/bin"):
        (qroot / d).mkdir(parents=True, exist_ok=True)
    here = Path(sys.executable).parent
    for tool in SOFTWARE:
        if (here / tool).exists():
            (qroot / "usr/bin" / tool).symlink_to(here / tool)


def cmd_run(args: argparse.Namespace) -> int:
    world = World(Path(args.dir))
    cmd = args.cmd
    if not cmd:
        raise SimError("no command given: qubes-sim run DIR [--in QUBE] -- CMD…", 2)
    if args.inside:
        world.get_qube(args.inside)
        if not world.is_running(args.inside):
            world.set_running(args.inside, True)
        env = world.qube_env(args.inside)
    else:
        env = world.dom0_env()
    os.chdir(env["HOME"])
    try:
        os.execvpe(cmd[0], cmd, env)
    except FileNotFoundError:
        raise SimError(f"{cmd[0]}: command not found", 127) from None


def cmd_mutate(args: argparse.Namespace) -> int:
    world = World(Path(args.dir))
    rng = random.Random(args.seed)
    qubes = world.load_qubes()
    names = args.qubes or [n for n in qubes if n != "backup"]
    for name in names:
        q = world.get_qube(name)
        was_running = world.is_running(name)
        if q.klass != "AdminVM":  # the qube ran and changed its data: start, write, stop (a commit)
            world.set_running(name, True)
        if q.klass == "AdminVM":
            home = world.dom0_home
            for i in range(3):
                (home / "Documents").mkdir(exist_ok=True)
                (home / "Documents" / f"new-{args.seed}-{i}.txt").write_bytes(
                    content._text_block(rng, rng.randint(500, 20000))
                )
            continue
        for vol in q.volumes:
            img = q.vm_dir(world) / f"{vol}.img"
            if img.exists():
                content.mutate_image(img, args.percent, rng)
        notes = q.vm_dir(world) / "notes.txt"
        if notes.exists():
            with open(notes, "a") as f:
                f.write(f"changed with seed {args.seed}\n")
        world.set_running(name, False)
        if was_running:
            world.set_running(name, True)
    print(f"qubes-sim: mutated {', '.join(names)} ({args.percent}% of blocks)")
    return 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def world_digest(world: World, names: list[str] | None = None, restored_home: bool = False) -> dict:
    """sha256 of everything a restore must bring back, keyed by qube name and file."""
    qubes = world.load_qubes()
    out: dict = {"qubes": {}, "dom0-home": {}}
    for name in names or sorted(qubes):
        q = world.get_qube(name)
        if q.klass == "AdminVM":
            continue
        files = {f.name: _sha256(f) for f in sorted(q.vm_dir(world).glob("*")) if f.is_file()}
        out["qubes"][name] = {"class": q.klass, "label": q.label, "template": q.template, "files": files}
    if names is None or "dom0" in names:
        home = world.dom0_home
        if restored_home:
            restores = sorted(home.glob("home-restore-*"))
            if not restores:
                raise SimError("no home-restore-* directory in dom0's home", 1)
            home = restores[-1] / "dom0-home" / world.user  # as real restores leave it
        for f in sorted(home.rglob("*")):
            rel = f.relative_to(home).as_posix()
            if f.is_file() and not rel.startswith(("home-restore-", "QubesIncoming")):
                out["dom0-home"][rel] = _sha256(f)
    return out


def cmd_digest(args: argparse.Namespace) -> int:
    digest = world_digest(World(Path(args.dir)), args.qubes or None, args.restored_home)
    if args.json:
        print(json.dumps(digest, indent=2, sort_keys=True))
    else:
        for name, info in digest["qubes"].items():
            for fname, sha in info["files"].items():
                print(f"{sha}  {name}/{fname}")
        for rel, sha in digest["dom0-home"].items():
            print(f"{sha}  dom0-home/{rel}")
    return 0


def appvm_count(text: str) -> int:
    if not text.isdigit() or int(text) > 200:
        raise argparse.ArgumentTypeError(f"not a number from 0 to 200: {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qubes-sim", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("init", help="create a world: a template, AppVMs, sys-net, a backup qube, dom0 home")
    s.add_argument("dir")
    s.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="small",
        help="small: ~12 MiB of volumes, for tests; demo: ~400 MiB",
    )
    s.add_argument("--size-mib", type=float, help="scale the volumes to about this many MiB in total")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--user", default="user", help="dom0 user name (default: user)")
    s.add_argument(
        "--pool",
        choices=sorted(storage.POOLS),
        default="vm-pool",
        help="the pool of every volume: vm-pool (lvm_thin, the default install), reflink (file-reflink), "
        "varlibqubes (file)",
    )
    s.add_argument(
        "--bare",
        action="store_true",
        help="a freshly installed system to restore into: dom0 and the backup qube only",
    )
    s.add_argument(
        "--appvms",
        type=appvm_count,
        default=0,
        metavar="N",
        help="N more AppVMs like personal, app-1 to app-N (0 to 200; default 0)",
    )
    s.set_defaults(func=cmd_init)
    s = sub.add_parser("run", help="run a command in dom0 (default) or in a qube, with that side's PATH/HOME")
    s.add_argument("dir")
    s.add_argument("--in", dest="inside", metavar="QUBE")
    # `--` ends qubes-sim's options: everything after it is the command (split off in main())
    s.set_defaults(cmd=[])
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("mutate", help="change volumes and dom0 home realistically (incremental tests)")
    s.add_argument("dir")
    s.add_argument("--percent", type=float, default=2.0)
    s.add_argument("--seed", type=int, default=2)
    s.add_argument("qubes", nargs="*")
    s.set_defaults(func=cmd_mutate)
    s = sub.add_parser("digest", help="sha256 of every volume and file a restore must bring back")
    s.add_argument("dir")
    s.add_argument("qubes", nargs="*")
    s.add_argument("--json", action="store_true")
    s.add_argument(
        "--restored-home",
        action="store_true",
        help="digest the newest ~/home-restore-*/dom0-home/USER instead of dom0's home",
    )
    s.set_defaults(func=cmd_digest)
    s = sub.add_parser(
        "demo", help="the whole of qtb-pipe on an emulated Qubes, as a user types it (make demo)"
    )
    s.add_argument("--dir", help="work directory (default: a new temporary one, removed afterwards)")
    s.add_argument("--engine", choices=["restic", "borg", "both"], default="both")
    s.add_argument("--profile", choices=["small", "demo"], default="demo", help="world size (default: demo)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(args.dir, args.engine, args.json, args.profile)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if argv[:1] == ["run"] and "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1 :]
    args = build_parser().parse_args(argv)
    if args.command == "run":
        args.cmd = command
    try:
        return args.func(args)
    except SimError as e:
        print(f"qubes-sim: error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
