"""An emulated Qubes OS installation that lives in one directory.

Layout of a world DIR:
  DIR/world.json                      emulator state (running qubes, dom0 user, seed)
  DIR/dom0/                           dom0's root: usr/bin (the real scrypt), usr/local/bin,
                                      etc/qubes/backup, var/lib/qubes (qubes.xml + file-pool volumes),
                                      home/<user>, var/tmp
  DIR/qubes/<name>/                   a qube's own filesystem: home/user, usr/bin, usr/local/bin
  DIR/.sim/dom0-bin/                  the emulated qvm-* tools (first on dom0's PATH)

qubes.xml is the source of truth for qubes and their properties, as on a real dom0.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DOM0_TOOLS = (
    "qvm-backup",
    "qvm-backup-restore",
    "qvm-run",
    "qvm-ls",
    "qvm-prefs",
    "qvm-start",
    "qvm-shutdown",
    "qvm-check",
    "qvm-volume",
    "qvm-pool",
    "qubes-prefs",
)
# systemd's default PATH, which qubesd inherits (its unit sets none): /usr/local before /usr.
SYSTEMD_DEFAULT_PATH = ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin")
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LABELS = ("red", "orange", "yellow", "green", "gray", "blue", "purple", "black")
VOLUME_FILES = {
    "TemplateVM": ("root", "private"),
    "StandaloneVM": ("root", "private"),
    "AppVM": ("private",),
    "AdminVM": (),
}


class SimError(Exception):
    """A failure the emulated tool reports as one line and a non-zero exit."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Qube:
    qid: int
    name: str
    klass: str
    label: str = "red"
    template: str | None = None
    netvm: str | None = None
    include_in_backups: bool = True
    provides_network: bool = False
    backup_timestamp: int | None = None  # set by qubesd after each successful backup
    features: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)

    @property
    def volumes(self) -> tuple[str, ...]:
        return VOLUME_FILES[self.klass]

    def vm_dir(self, world: World) -> Path:
        sub = "vm-templates" if self.klass == "TemplateVM" else "appvms"
        return world.dom0 / "var/lib/qubes" / sub / self.name


class World:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        if not (self.root / "world.json").is_file():
            raise SimError(f"{self.root} is not a qubes-sim world (run: qubes-sim init {self.root})", 2)
        self.dom0 = self.root / "dom0"
        self.state = json.loads((self.root / "world.json").read_text())

    # --- persistent state ----------------------------------------------------------------
    @property
    def user(self) -> str:
        return self.state["dom0_user"]

    @property
    def default_pool(self) -> str:
        """qubes-prefs default_pool (facts V8): init --pool's; vm-pool in worlds made before it was kept."""
        return self.state.get("default_pool", "vm-pool")

    @property
    def dom0_home(self) -> Path:
        return self.dom0 / "home" / self.user

    @property
    def qubes_xml_path(self) -> Path:
        return self.dom0 / "var/lib/qubes/qubes.xml"

    def save_state(self) -> None:
        tmp = self.root / f".world.json.{os.getpid()}"
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        os.replace(tmp, self.root / "world.json")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[dict]:
        """The state, reloaded and saved under a lock: several emulated processes change it."""
        with open(self.root / ".sim/state.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.state = json.loads((self.root / "world.json").read_text())
            yield self.state
            self.save_state()

    def is_running(self, name: str) -> bool:
        return name == "dom0" or name in self.state.setdefault("running", [])

    def set_running(self, name: str, running: bool) -> None:
        """Start or stop a qube; a qube that ran commits its volumes when it stops (storage.py)."""
        with self.transaction() as state:
            run = set(state.setdefault("running", []))
            was = name == "dom0" or name in run
            (run.add if running else run.discard)(name)
            state["running"] = sorted(run)
        if was and not running:
            from .storage import on_stop

            on_stop(self, name)

    @classmethod
    def current(cls) -> World:
        """The world an emulated dom0 tool runs in (QUBES_SIM_DIR, set by `qubes-sim run`)."""
        root = os.environ.get("QUBES_SIM_DIR")
        if not root:
            raise SimError("QUBES_SIM_DIR is not set: run this through `qubes-sim run DIR -- …`", 2)
        return cls(Path(root))

    def qube_root(self, name: str) -> Path:
        return self.root / "qubes" / name

    def qube_home(self, name: str) -> Path:
        return self.qube_root(name) / "home/user"

    # --- qubes.xml -----------------------------------------------------------------------
    def load_qubes(self) -> dict[str, Qube]:
        return parse_qubes_xml(self.qubes_xml_path.read_bytes())

    def save_qubes(self, qubes: dict[str, Qube]) -> None:
        tmp = self.qubes_xml_path.with_suffix(".xml.tmp")
        tmp.write_bytes(render_qubes_xml(qubes))
        os.replace(tmp, self.qubes_xml_path)

    def get_qube(self, name: str) -> Qube:
        qubes = self.load_qubes()
        if name not in qubes:
            raise SimError(f"no such domain: '{name}'", 2)
        return qubes[name]

    # --- environments ----------------------------------------------------------------------
    def sim_bin(self) -> Path:
        return self.root / ".sim/dom0-bin"

    def dom0_env(self) -> dict[str, str]:
        """Environment of a user shell in dom0: emulated qvm-* first, then dom0's own PATH."""
        env = dict(os.environ)
        parts = [
            str(self.sim_bin()),
            str(self.dom0 / "usr/local/bin"),
            str(self.dom0 / "usr/bin"),
            str(Path(sys.executable).parent),
            HOST_PATH,
        ]
        env.update(
            PATH=":".join(parts),
            HOME=str(self.dom0_home),
            USER=self.user,
            LOGNAME=self.user,  # getpass.getuser() reads it first (sudo and ssh set it)
            QUBES_SIM_DIR=str(self.root),
            QTB_PIPE_ROOT=str(self.dom0),
        )
        return env

    def qubesd_path(self) -> str:
        """qubesd's PATH: systemd's default, looked up inside the emulated dom0 root."""
        return ":".join([str(self.dom0 / d) for d in SYSTEMD_DEFAULT_PATH] + [HOST_PATH])

    def qube_env(self, name: str) -> dict[str, str]:
        """Environment of the qube's default user: its own PATH and HOME, nothing of dom0."""
        root = self.qube_root(name)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("QTB_", "QUBES_SIM"))}
        env.update(
            PATH=f"{root}/usr/local/bin:{root}/usr/bin:{HOST_PATH}",
            HOME=str(root / "home/user"),
            USER="user",
            QUBES_SIM_QUBE=name,
        )
        return env


# --- qubes.xml (the structure of Qubes 4's /var/lib/qubes/qubes.xml) ------------------------
def _bool(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def render_qubes_xml(qubes: dict[str, Qube]) -> bytes:
    root = ET.Element("qubes", version="3.0")
    props = ET.SubElement(root, "properties")
    templates = [q.name for q in qubes.values() if q.klass == "TemplateVM"]
    if templates:
        ET.SubElement(props, "property", name="default_template").text = templates[0]
    labels = ET.SubElement(root, "labels")
    for i, color in enumerate(LABELS, start=1):
        ET.SubElement(labels, "label", id=f"label-{i}", color="0x000000").text = color
    domains = ET.SubElement(root, "domains")
    for q in sorted(qubes.values(), key=lambda q: q.qid):
        dom = ET.SubElement(domains, "domain", id=f"domain-{q.qid}", **{"class": q.klass})
        p = ET.SubElement(dom, "properties")
        values = {"qid": str(q.qid), "name": q.name, "include_in_backups": str(q.include_in_backups)}
        if q.template:
            values["template"] = q.template
        if q.netvm is not None:
            values["netvm"] = q.netvm
        if q.provides_network:
            values["provides_network"] = "True"
        if q.backup_timestamp is not None:
            values["backup_timestamp"] = str(q.backup_timestamp)
        for key, value in values.items():
            ET.SubElement(p, "property", name=key).text = value
        ET.SubElement(p, "property", name="label", ref=f"label-{LABELS.index(q.label) + 1}")
        feats = ET.SubElement(dom, "features")
        for key, value in sorted(q.features.items()):
            ET.SubElement(feats, "feature", name=key).text = value
        tags = ET.SubElement(dom, "tags")
        for tag in q.tags:
            ET.SubElement(tags, "tag", name=tag)
    ET.indent(root)
    return b"<?xml version='1.0' encoding='UTF-8'?>\n" + ET.tostring(root) + b"\n"


def parse_qubes_xml(data: bytes) -> dict[str, Qube]:
    root = ET.fromstring(data)
    labels = {el.get("id"): el.text for el in root.iterfind("labels/label")}
    qubes: dict[str, Qube] = {}
    for dom in root.iterfind("domains/domain"):
        props = {el.get("name"): el for el in dom.iterfind("properties/property")}
        text = {k: (el.text or "") for k, el in props.items()}
        label_el = props.get("label")
        q = Qube(
            qid=int(text["qid"]),
            name=text["name"],
            klass=dom.get("class", "AppVM"),
            label=labels.get(label_el.get("ref"), "red") if label_el is not None else "red",
            template=text.get("template") or None,
            netvm=text.get("netvm"),
            include_in_backups=_bool(text.get("include_in_backups", "True")),
            provides_network=_bool(text.get("provides_network")),
            backup_timestamp=int(text["backup_timestamp"]) if text.get("backup_timestamp") else None,
            features={el.get("name"): el.text or "" for el in dom.iterfind("features/feature")},
            tags=[el.get("name") for el in dom.iterfind("tags/tag")],
        )
        qubes[q.name] = q
    return qubes


def write_tool_wrappers(world_root: Path) -> None:
    """The emulated dom0 tools: tiny scripts that run this emulator with this Python."""
    bindir = world_root / ".sim/dom0-bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for tool in DOM0_TOOLS:
        path = bindir / tool
        path.write_text(f'#!/bin/sh\nexec {sys.executable} -m qubes_sim.tools {tool} "$@"\n')
        path.chmod(0o755)


def real_scrypt() -> str:
    found = shutil.which("scrypt", path=HOST_PATH)
    if not found:
        raise SimError("the real scrypt is not installed (run: make setup)", 3)
    return os.path.realpath(found)
