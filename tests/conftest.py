"""Shared fixtures: emulated Qubes worlds (qubes_sim) driven through their real command lines."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
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
