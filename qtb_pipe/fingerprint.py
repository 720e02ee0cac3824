"""Telling a qube that did not change since its last copy without reading it (facts §8).

A backup holds each saved volume in its committed state, the qube's settings in qubes.xml, and its
firewall.xml and notes.txt. The committed state changes only on a commit, and on lvm_thin and
file-reflink pools every commit changes the revision list (qvm-volume). So the fingerprint covers,
per saved volume, pool, vid, size, revisions_to_keep and the revision ids, plus the qube's
<domain> entry in qubes.xml (without backup_timestamp, which every backup sets) and the two files.
Anything the facts do not cover makes it None: always back up. Known gap: `qvm-volume revert` on
lvm_thin changes the data but no revision id (docs/qubes-facts.md); back up with --full after one.
"""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET

from . import proc, qubes
from .config import root

SAFE_DRIVERS = ("lvm_thin", "file-reflink")
VOLUME_KEYS = ("pool", "vid", "size", "revisions_to_keep", "save_on_stop")  # the facts' list (§8)


class Unknown(Exception):
    """The qube's state cannot be told from its metadata; the message says why."""


def _volume(qube: str, volume: str, drivers: dict[str, str]) -> dict | None:
    res = proc.run(["qvm-volume", "info", f"{qube}:{volume}"])
    if res.code != 0:
        if b"has no volume" in res.stderr:
            return None
        raise Unknown(f"qvm-volume info {qube}:{volume} failed")
    text = res.stdout.decode()
    info = qubes.info_table(text.split("List of available revisions")[0])
    if info.get("save_on_stop") != "True":
        return None
    pool = info.get("pool", "")
    if pool not in drivers:
        drivers[pool] = qubes.pool_info(pool).get("driver", "?")
    if drivers[pool] not in SAFE_DRIVERS:
        raise Unknown(f"pool {pool} ({drivers[pool]}) does not tell changed volumes by their revisions")
    if not info.get("revisions_to_keep", "").isdigit() or int(info["revisions_to_keep"]) < 1:
        raise Unknown(f"{volume} keeps no revisions (revisions_to_keep = {info.get('revisions_to_keep')})")
    revisions = [
        line.strip() for line in text.split("(for revert):")[-1].splitlines() if line.startswith("  ")
    ]
    return {**{k: info.get(k) for k in VOLUME_KEYS}, "revisions": revisions}


def _domain(element: ET.Element) -> str:
    """The qube's entry without backup_timestamp and without layout whitespace (which moves with it)."""
    for props in element.iterfind("properties"):
        for prop in props.findall("property[@name='backup_timestamp']"):
            props.remove(prop)
    for node in element.iter():
        node.tail = None
        node.text = node.text if node.text and node.text.strip() else None
    return ET.tostring(element, encoding="unicode")


def _file(path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def domains() -> dict[str, ET.Element]:
    """Every qube's <domain> entry in dom0's qubes.xml (what a backup saves of its settings; only
    properties set explicitly are there). Empty when it cannot be read."""
    try:
        xml = ET.parse(root() / "var/lib/qubes/qubes.xml").getroot()
    except (OSError, ET.ParseError):
        return {}
    return {d.findtext("properties/property[@name='name']"): d for d in xml.iterfind("domains/domain")}


def explicit(domain: ET.Element | None, prop: str) -> str | None:
    """A property's value if it is set explicitly (restore checks templates and net qubes so)."""
    return None if domain is None else domain.findtext(f"properties/property[@name='{prop}']") or None


def fingerprints(names: list[str]) -> dict[str, str | Unknown | None]:
    """Per qube: its fingerprint, or the Unknown that says why it is always backed up."""
    settings = domains()
    drivers: dict[str, str] = {}
    out: dict[str, str | Unknown | None] = {}
    for name in names:
        try:
            if name == "dom0":
                raise Unknown("dom0's home has no volume revisions")
            if name not in settings:
                raise Unknown("not readable in /var/lib/qubes/qubes.xml")
            klass = "vm-templates" if settings[name].get("class") == "TemplateVM" else "appvms"
            folder = root() / "var/lib/qubes" / klass / name
            parts = {
                "volumes": {v: _volume(name, v, drivers) for v in ("root", "private")},
                "domain": _domain(settings[name]),
                "files": {f: _file(folder / f) for f in ("firewall.xml", "notes.txt")},
            }
            out[name] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        except (Unknown, OSError) as e:
            out[name] = e if isinstance(e, Unknown) else Unknown(f"cannot read its files ({e.strerror})")
    return out
