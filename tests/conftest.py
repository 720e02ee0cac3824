"""Shared fixtures: emulated Qubes worlds (qubes_sim) driven through their real command lines."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from drivertools import clone_world, qtb_json, setup_qtb
from simtools import Sim, make_world


@pytest.fixture(scope="session")
def world_template(tmp_path_factory) -> Path:
    """One small world, made once; tests get private copies."""
    path = tmp_path_factory.mktemp("template") / "world"
    make_world(path, "--profile", "small", "--seed", "7")
    return path


@pytest.fixture
def world(world_template: Path, tmp_path: Path) -> Sim:
    dest = tmp_path / "world"
    shutil.copytree(world_template, dest, symlinks=True)
    return Sim(dest)


@pytest.fixture
def fresh_world(tmp_path: Path) -> Sim:
    """A freshly installed system to restore into: dom0 and the backup qube only."""
    return make_world(tmp_path / "fresh", "--bare")


@pytest.fixture
def passphrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "passphrase"
    path.write_text("correct horse battery staple\n")
    return path


# Driver tests run with restic in the fast tier and with borg in the slow one (the dom0 logic is the
# same; engine-specific cases parametrize both engines themselves).
@pytest.fixture(params=["restic", pytest.param("borg", marks=pytest.mark.slow)])
def engine(request) -> str:
    return request.param


@dataclass
class BackedUp:
    """A world set up with qtb-pipe (dom0 and a repository in the backup qube) and backed up once."""

    world: Sim
    recovery_key: str
    snapshots: dict[str, str]  # qube -> the snapshot of its copy (one qvm-backup per qube)

    @property
    def repo(self) -> Path:
        return next(self.world.qube_home("backup").glob("repo-*"))


@pytest.fixture(scope="session")
def backup_template(world_template: Path, tmp_path_factory) -> Callable[[str], BackedUp]:
    """Per engine, made once per test process: the full backup most driver tests start from."""
    made: dict[str, BackedUp] = {}

    def get(engine: str) -> BackedUp:
        if engine not in made:
            root = tmp_path_factory.mktemp(f"backed-up-{engine}") / "world"
            shutil.copytree(world_template, root, symlinks=True)
            world = Sim(root)
            key = setup_qtb(world, engine, world.qube_home("backup") / f"repo-{engine}")
            done = qtb_json(world, "backup")["qubes"]
            made[engine] = BackedUp(world, key, {qube: q["snapshot"] for qube, q in done.items()})
        return made[engine]

    return get


@pytest.fixture
def backed_up(backup_template, engine: str, tmp_path: Path) -> BackedUp:
    """A private copy of the backed-up world of `engine` (no full backup repeated per test)."""
    template = backup_template(engine)
    return BackedUp(
        clone_world(template.world, tmp_path / "world"), template.recovery_key, dict(template.snapshots)
    )
