"""`qubes-sim demo` (`make demo`): all of qtb-pipe on an emulated Qubes, with the real engines.

Every step is a command a user would type, run inside the emulated dom0 or backup qube:
init, install-shim, adapter init, a first backup of every qube, a day on which two qubes ran, a
nightly backup that reads only those two, list, a verify of every qube's newest copy, then
`restore --all` into a freshly installed world with the recovery key, and digests compared.
"""

from __future__ import annotations

import json
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qtb_pipe.ui import human_bytes, human_duration

from .world import SimError


class Demo:
    def __init__(self, workdir: Path, quiet: bool) -> None:
        self.dir, self.quiet = workdir, quiet
        self.bin = Path(sys.executable).parent

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def sh(
        self, world: Path, *cmd: str, inside: str | None = None, show: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess:
        where = inside or "dom0"
        if show:
            self.say(f"[{world.name}:{where}]$ {shlex.join(cmd)}")
        argv = (
            [str(self.bin / "qubes-sim"), "run", str(world)]
            + (["--in", inside] if inside else [])
            + ["--", *cmd]
        )
        proc = subprocess.run(argv, capture_output=True, input=input)
        if show and not self.quiet:
            for stream in (proc.stderr, proc.stdout):  # progress notes first, then results
                text = stream.decode(errors="replace").rstrip()
                if text and cmd[-1] != "--json":
                    print("  " + text.replace("\n", "\n  "))
        if proc.returncode != 0:
            raise SimError(
                f"demo step failed ({shlex.join(cmd)}): "
                f"{proc.stderr.decode(errors='replace').strip().splitlines()[-1:]}"
            )
        return proc

    def sim(self, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.bin / "qubes-sim"), *args], capture_output=True)
        if proc.returncode != 0:
            raise SimError(f"qubes-sim {args[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
        return proc

    def json(self, world: Path, *cmd: str, inside: str | None = None) -> object:
        return json.loads(self.sh(world, *cmd, "--json", inside=inside).stdout)

    def setup_backup_qube(self, world: Path, engine: str, repo: Path, password: str) -> None:
        pw_file = world / "qubes/backup/home/user/.config/qtb-pipe" / f"{engine}.password"
        pw_file.parent.mkdir(parents=True, exist_ok=True)
        pw_file.write_text(password + "\n")
        pw_file.chmod(0o600)
        self.sh(
            world,
            "qtb-adapter",
            "init",
            "--engine",
            engine,
            "--repo",
            str(repo),
            "--password-file",
            str(pw_file),
            inside="backup",
        )


def run_demo(workdir: str | None, engine_choice: str, as_json: bool, profile: str = "demo") -> dict:
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="qtb-pipe-demo-"))
    tmp.mkdir(parents=True, exist_ok=True)
    demo = Demo(tmp, as_json)
    engines = ["restic", "borg"] if engine_choice == "both" else [engine_choice]
    report: dict = {"workdir": str(tmp), "engines": {}}
    started = time.monotonic()
    try:
        world = tmp / "world"
        demo.say(f"== creating an emulated Qubes ({profile} profile) in {world}")
        demo.sim("init", str(world), "--profile", profile)
        demo.say(demo.sim("digest", str(world)).stdout.decode().count("\n").__str__() + " files to protect")
        init = demo.json(world, "qtb-pipe", "init", "--backup-qube", "backup")
        recovery_key = init["recovery_key"]
        demo.sh(world, "qtb-pipe", "install-shim")
        demo.sh(world, "qtb-pipe", "shim-status")
        demo.sh(world, "qtb-pipe", "config", "check")
        for engine in engines:
            password = secrets.token_hex(16)
            repo = world / "qubes/backup/home/user" / f"repo-{engine}"
            demo.say(f"\n== {engine}: repository in the backup qube, engine password kept there only")
            demo.setup_backup_qube(world, engine, repo, password)
            first = demo.json(world, "qtb-pipe", "backup", "--engine", engine, "--full")
            demo.say(
                f"  first night, every qube: {human_bytes(first['stream_bytes'])} streamed, "
                f"{human_bytes(first['added_bytes'])} added in {human_duration(first['seconds'])}"
            )
            demo.sim(
                "mutate",
                str(world),
                "work",
                "vault",
                "--percent",
                "2",
                "--seed",
                str(len(report["engines"]) + 11),
            )
            demo.say("  (the day: work and vault ran and changed 2% of their volumes; the rest did not run)")
            demo.sh(world, "qtb-pipe", "backup", "--dry-run", "--engine", engine)
            night = demo.json(world, "qtb-pipe", "backup", "--engine", engine)
            backed = [q for q, r in night["qubes"].items() if r["status"] == "backed up"]
            demo.say(
                f"  the night: {', '.join(backed)} backed up, the rest unchanged: "
                f"{human_bytes(night['stream_bytes'])} streamed, {human_bytes(night['added_bytes'])} added "
                f"in {human_duration(night['seconds'])}"
            )
            demo.sh(world, "qtb-pipe", "list", "--engine", engine)
            verify = demo.json(world, "qtb-pipe", "verify", "--engine", engine)
            demo.say(f"  verify: the newest copy of each of {len(verify['qubes'])} qubes test-restored")
            kit = demo.json(world, "qtb-pipe", "recovery-kit", "--engine", engine)
            demo.say(
                "  recovery sheet (qtb-pipe recovery-kit): the recovery key, the repository, its engine "
                "password" + (" and borg's key" if kit["key_export"] else "")
            )
            if kit["recovery_key"].replace("-", "")[:64] != recovery_key.replace("-", "")[:64]:
                raise SimError("demo: the recovery sheet holds another key than init showed")
            fresh = tmp / f"fresh-{engine}"
            demo.say(f"\n== {engine}: the laptop is lost: a fresh system and only the recovery sheet")
            demo.sim("init", str(fresh), "--bare")
            demo.setup_backup_qube(fresh, kit["engine"], Path(kit["repository"]), kit["password"])
            key = kit["recovery_key"]
            demo.sh(
                fresh,
                "qtb-pipe",
                "init",
                "--backup-qube",
                kit["backup_qube"],
                "--engine",
                engine,
                "--recovery-key",
                key,
            )
            demo.sh(fresh, "qtb-pipe", "install-shim")
            # sys-net was not backed up (include_in_backups false): restored qubes get the default net qube
            demo.sh(
                fresh, "qtb-pipe", "restore", "--all", "--new-system", "--ignore-missing", "--engine", engine
            )
            qubes = list(night["qubes"])
            expected = json.loads(demo.sim("digest", str(world), *qubes, "--json").stdout)
            got = json.loads(demo.sim("digest", str(fresh), *qubes, "--json", "--restored-home").stdout)
            same = expected == got
            demo.say(f"  digests of every volume and dom0-home file: {'IDENTICAL' if same else 'DIFFERENT'}")
            if not same:
                raise SimError(f"demo: restored world differs from the original ({engine})")
            report["engines"][engine] = {
                "first": first,
                "night": night,
                "backed_up_at_night": backed,
                "verify": {k: verify[k] for k in ("snapshots", "qubes")},
                "restore_identical": same,
                "night_added_percent": round(100 * (night["added_bytes"] or 0) / first["stream_bytes"], 2),
            }
        report["seconds"] = round(time.monotonic() - started, 1)
        if not as_json:
            demo.say("\n== summary")
            for engine, r in report["engines"].items():
                demo.say(
                    f"  {engine:<7} first night {human_bytes(r['first']['added_bytes'])} stored; next night "
                    f"read only {', '.join(r['backed_up_at_night'])}, added {r['night_added_percent']}% of a "
                    "full stream; every qube verified; restore --all byte-identical"
                )
            kept = f"; worlds and repositories kept in {tmp}" if workdir else " (--dir DIR keeps the worlds)"
            demo.say(f"  total {human_duration(report['seconds'])}{kept}")
        return report
    finally:
        if not workdir:
            shutil.rmtree(tmp, ignore_errors=True)
