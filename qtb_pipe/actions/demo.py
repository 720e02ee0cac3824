"""`qtb-pipe demo`: the whole pipe on an emulated Qubes (qubes-sim), with the real engines.

Every step is a command a user would type, run inside the emulated dom0 or backup qube:
init, install-shim, adapter init, backup, change the qubes, incremental backup, list, verify,
then a restore into a freshly installed world with the recovery key, and digests compared.
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

from ..errors import EXIT_FAILED, QtbError
from ..ui import human_bytes, human_duration


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
            raise QtbError(
                f"demo step failed ({shlex.join(cmd)}): "
                f"{proc.stderr.decode(errors='replace').strip().splitlines()[-1:]}",
                EXIT_FAILED,
            )
        return proc

    def sim(self, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.bin / "qubes-sim"), *args], capture_output=True)
        if proc.returncode != 0:
            raise QtbError(f"qubes-sim {args[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
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
            first = demo.json(world, "qtb-pipe", "backup", "--engine", engine)
            demo.say(
                f"  full backup: {human_bytes(first['stream_bytes'])} streamed, "
                f"{human_bytes(first['added_bytes'])} added in {human_duration(first['seconds'])}"
            )
            demo.sim("mutate", str(world), "--percent", "2", "--seed", str(len(report["engines"]) + 11))
            demo.say("  (2% of every volume changed, data inserted and appended, new files in dom0 home)")
            second = demo.json(world, "qtb-pipe", "backup", "--engine", engine)
            demo.say(
                f"  incremental: {human_bytes(second['stream_bytes'])} streamed, "
                f"{human_bytes(second['added_bytes'])} added in {human_duration(second['seconds'])}"
            )
            demo.sh(world, "qtb-pipe", "list", "--engine", engine)
            verify = demo.json(world, "qtb-pipe", "verify", second["snapshot"], "--engine", engine)
            fresh = tmp / f"fresh-{engine}"
            demo.say(f"\n== {engine}: restore into a freshly installed system with the recovery key")
            demo.sim("init", str(fresh), "--bare")
            demo.sh(fresh, "qtb-pipe", "init", "--backup-qube", "backup", "--recovery-key", recovery_key)
            demo.sh(fresh, "qtb-pipe", "install-shim")
            demo.setup_backup_qube(fresh, engine, repo, password)
            demo.sh(fresh, "qtb-pipe", "restore", second["snapshot"], "--engine", engine, "--new-system")
            expected = json.loads(demo.sim("digest", str(world), *second["qubes"], "--json").stdout)
            got = json.loads(
                demo.sim("digest", str(fresh), *second["qubes"], "--json", "--restored-home").stdout
            )
            same = expected == got
            demo.say(f"  digests of every volume and dom0-home file: {'IDENTICAL' if same else 'DIFFERENT'}")
            if not same:
                raise QtbError(f"demo: restored world differs from the original ({engine})", EXIT_FAILED)
            report["engines"][engine] = {
                "full": first,
                "incremental": second,
                "verify": {k: verify[k] for k in ("snapshot", "qubes")},
                "restore_identical": same,
                "incremental_added_percent": round(
                    100 * (second["added_bytes"] or 0) / second["stream_bytes"], 2
                ),
            }
        report["seconds"] = round(time.monotonic() - started, 1)
        if not as_json:
            demo.say("\n== summary")
            for engine, r in report["engines"].items():
                demo.say(
                    f"  {engine:<7} full {human_bytes(r['full']['added_bytes'])} stored, incremental added "
                    f"{r['incremental_added_percent']}% of the stream, restore byte-identical"
                )
            kept = f"; worlds and repositories kept in {tmp}" if workdir else " (--dir DIR keeps the worlds)"
            demo.say(f"  total {human_duration(report['seconds'])}{kept}")
        return report
    finally:
        if not workdir:
            shutil.rmtree(tmp, ignore_errors=True)
