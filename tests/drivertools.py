"""Driving `qtb-pipe` in qubes-sim worlds from tests: commands, set-up, attackers, world copies."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from jsoncontract import check_answer
from simtools import Sim

TESTS = Path(__file__).parent
ALL = ("debian-12", "work", "personal", "vault", "dom0")
# the driver's own calls to the real scrypt never happen in qtb mode; keep stock defaults otherwise
QTB_ENV = {"QUBES_SIM_TEST_SCRYPT_MAXTIME": None}
ENGINE_PASSWORD = "engine password that never leaves the backup qube\n"


def qtb(world: Sim, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run qtb-pipe in `world`; a `--json` answer is checked against its schema (docs/json/)."""
    proc = world.run("qtb-pipe", *args, env={**QTB_ENV, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"qtb-pipe {args} failed ({proc.returncode}): {proc.stderr.decode()}")
    if "--json" in args and "--help" not in args:
        check_answer(args, proc.stdout, proc.returncode)
    return proc


def one_line_error(proc: subprocess.CompletedProcess, code: int) -> str:
    """The error: one line, the last on stderr (progress notes may come before it)."""
    text = proc.stderr.decode()
    assert proc.returncode == code, text
    errors = [line for line in text.splitlines() if re.match(r"qtb-(pipe|adapter)( [a-z-]+)?: error", line)]
    assert len(errors) == 1 and text.endswith(errors[0] + "\n") and "Traceback" not in text, text
    return errors[0]


def qtb_json(world: Sim, *args: str) -> object:
    return json.loads(qtb(world, *args, "--json").stdout)


def adapter_init(
    world: Sim, engine: str, repo: Path | str, *settings: str, password: str = ENGINE_PASSWORD
) -> None:
    pw = world.qube_home("backup") / f"{engine}.password"
    pw.write_text(password)
    world.run(
        "qtb-adapter",
        "init",
        "--engine",
        engine,
        "--repo",
        str(repo),
        "--password-file",
        str(pw),
        *settings,
        inside="backup",
        check=True,
    )


def setup_qtb(world: Sim, engine: str, repo: Path, recovery_key: str | None = None) -> str:
    """Configure dom0 (secret, shim) and the backup qube (repository); returns the recovery key."""
    args = ["init", "--backup-qube", "backup", "--engine", engine]
    if recovery_key:
        args += ["--recovery-key", recovery_key]
    result = qtb_json(world, *args)
    qtb(world, "install-shim")
    adapter_init(world, engine, repo)
    return recovery_key or result["recovery_key"]


def install_attacker(world: Sim, attack: dict) -> None:
    """A compromised backup qube: tests/attacker.py in front of the real adapter (see its docstring)."""
    (world.qube_home("backup") / "attack.json").write_text(json.dumps(attack))
    wrapper = world.root / "qubes/backup/usr/local/bin/qtb-adapter"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {TESTS / "attacker.py"} "$@"\n')
    wrapper.chmod(0o755)


def remove_attacker(world: Sim) -> None:
    (world.root / "qubes/backup/usr/local/bin/qtb-adapter").unlink(missing_ok=True)


def mutate(world: Sim, *qubes: str, seed: int = 2) -> None:
    subprocess.run(
        ["qubes-sim", "mutate", str(world.root), *qubes, "--seed", str(seed)], check=True, capture_output=True
    )


# Files that hold the world's absolute path: the shim's install-time constants, the adapter's
# config, borg's record of where each repository is (it refuses a moved one). Not the adapter's
# state (~/.local): its cache then names another repository and is ignored, as it must be.
PATH_HOLDERS = ("dom0/usr/local/bin", "qubes/backup/home/user/.config")


def clone_world(src: Sim, dest: Path) -> Sim:
    """A private copy of a world that was set up and backed up once (a shared fixture), with every
    recorded absolute path moved along, so that it behaves as if it had been made at `dest`."""
    shutil.copytree(src.root, dest, symlinks=True)
    old, new = str(src.root).encode(), str(dest.resolve()).encode()
    for holder in PATH_HOLDERS:
        for path in (dest / holder).rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20:
                data = path.read_bytes()
                if old in data:
                    path.write_bytes(data.replace(old, new))
    return Sim(dest.resolve())
