"""Driving qubes_sim worlds from tests through their real command lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
# The project's tools (qubes-sim, qtb-pipe, qtb-adapter, restic) live next to this python.
os.environ["PATH"] = f"{VENV_BIN}:{os.environ.get('PATH', '')}"
# Test-only switches of the emulator: small chunks so multi-chunk paths run on small worlds, and
# scrypt's work factor lowered the way Qubes' own tests do (`-t 0.1`). Tests that need the real
# default unset them explicitly (value None).
FAST_ENV = {"QUBES_SIM_TEST_CHUNK_SIZE": str(1024 * 1024), "QUBES_SIM_TEST_SCRYPT_MAXTIME": "0.1"}


@dataclass
class Sim:
    """A qubes-sim world directory and a way to run commands in it."""

    root: Path

    def run(
        self,
        *cmd: str,
        inside: str | None = None,
        env: dict[str, str] | None = None,
        input: bytes | None = None,
        check: bool = False,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess:
        argv = ["qubes-sim", "run", str(self.root)]
        if inside:
            argv += ["--in", inside]
        full_env = {**os.environ, **FAST_ENV, **(env or {})}
        full_env = {k: v for k, v in full_env.items() if v is not None}
        proc = subprocess.run(
            [*argv, "--", *cmd], env=full_env, input=input, capture_output=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{cmd} failed ({proc.returncode}):\n{proc.stdout.decode()}\n{proc.stderr.decode()}"
            )
        return proc

    def digest(self, *qubes: str, restored_home: bool = False) -> dict:
        argv = ["qubes-sim", "digest", str(self.root), *qubes, "--json"]
        if restored_home:
            argv.append("--restored-home")
        return json.loads(subprocess.run(argv, check=True, capture_output=True).stdout)

    def qube_home(self, name: str) -> Path:
        return self.root / "qubes" / name / "home/user"

    @property
    def dom0(self) -> Path:
        return self.root / "dom0"

    @property
    def dom0_home(self) -> Path:
        (home,) = (self.dom0 / "home").iterdir()  # the world's one dom0 user
        return home


def make_world(path: Path, *extra: str) -> Sim:
    subprocess.run(["qubes-sim", "init", str(path), *extra], check=True, capture_output=True)
    return Sim(path)
