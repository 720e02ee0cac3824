"""A compromised backup qube: stands in front of the real qtb-adapter and alters what it serves.

Installed by tests as `usr/local/bin/qtb-adapter` in the emulated backup qube (ahead of the real one
on the qube's PATH). ~/attack.json says what to do:
  {"flip": "MEMBER"}                     flip one byte in MEMBER's data
  {"drop": "MEMBER"}                     leave MEMBER out of the stream
  {"drop_last_of": "FILE"}               leave out the last chunk of FILE (e.g. vm1/root.img)
  {"inflate": "MEMBER", "to": BYTES}     serve MEMBER padded with zeros to BYTES (a dom0 disk filler)
  {"junk": N, "size": BYTES, "after": MEMBER}  serve N files of BYTES zeros (DIR/junk.NNNN.enc)
                                         right after MEMBER: each within dom0's file bound, together
                                         a dom0 disk filler
  {"swap": "MEMBER", "from": SNAPSHOT}   serve MEMBER as stored in another snapshot
  {"reserve": "MEMBER", "after": "OTHER"} serve the genuine MEMBER once more, right after OTHER
  {"serve": SNAPSHOT}                    serve another snapshot's stream for any dump
  {"serve": SNAPSHOT, "manifest": true}  ... and its manifest too
  {"manifest_flip": SNAPSHOT}            flip one byte in the middle of SNAPSHOT's sealed manifest
  {"answer": {"COMMAND": JSON}}          answer COMMAND (commit, check, prune…) with JSON, exit 0,
                                         doing nothing (stdin is read and dropped)
  {"stall": "COMMAND", "seconds": N}     COMMAND hangs N seconds without reading stdin, then exits 1
  {"slow": SECONDS}                      serve the stream genuinely, pausing SECONDS after each chunk
  {"lose_answer": "COMMAND"}             COMMAND runs for real, then its answer is lost (exit 1, no
                                         output): a backup qube that dies once the work is done
Everything else is passed to the real adapter unchanged.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REAL = Path(os.environ["HOME"]).parent.parent / "usr/bin/qtb-adapter"


def real(*args: str) -> bytes:
    return subprocess.run([str(REAL), *args], check=True, capture_output=True).stdout


def members(stream: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r:", ignore_zeros=True) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def serialise(items: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    for info, data in items:  # one archive per member, as qubesd sends them
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        out.write(buf.getvalue())
    return out.getvalue()


def main(argv: list[str]) -> int:
    attack = json.loads((Path(os.environ["HOME"]) / "attack.json").read_text())
    command = argv[0] if argv else ""
    rest = argv[1:]
    if command == attack.get("stall"):
        time.sleep(attack["seconds"])
        return 1
    if command == attack.get("lose_answer"):
        subprocess.run([str(REAL), *argv], capture_output=True)
        return 1
    if command in attack.get("answer", {}):
        sys.stdin.buffer.read()
        print(json.dumps(attack["answer"][command]))
        return 0
    if command == "manifest" and rest[:1] == [attack.get("manifest_flip")]:
        sealed = bytearray(real(*argv))
        sealed[len(sealed) // 2] ^= 0x01
        sys.stdout.buffer.write(bytes(sealed))
        return 0
    if command == "manifest" and attack.get("manifest") and "serve" in attack:
        sys.stdout.buffer.write(real("manifest", attack["serve"], *rest[1:]))
        return 0
    if command != "dump":
        os.execv(str(REAL), [str(REAL), *argv])
    snapshot = attack.get("serve", rest[0])
    items = members(real("dump", snapshot, *rest[1:]))
    if "flip" in attack:
        for info, data in items:
            if info.name == attack["flip"]:
                changed = bytearray(data)
                changed[len(changed) // 2] ^= 0x01
                items[items.index((info, data))] = (info, bytes(changed))
    if "inflate" in attack:
        items = [(i, d.ljust(attack["to"], b"\0") if i.name == attack["inflate"] else d) for i, d in items]
    if "junk" in attack:
        at = next(n for n, (i, _) in enumerate(items) if i.name == attack["after"]) + 1
        for n in range(attack["junk"]):
            info = copy.copy(items[at - 1][0])
            info.name = f"{os.path.dirname(attack['after'])}/junk.{n:04d}.enc"
            items.insert(at + n, (info, bytes(attack["size"])))
    if "drop" in attack:
        items = [(i, d) for i, d in items if i.name != attack["drop"]]
    if "drop_last_of" in attack:
        chunks = [i.name for i, _ in items if i.name.startswith(attack["drop_last_of"] + ".")]
        items = [(i, d) for i, d in items if i.name != max(chunks)]
    if "reserve" in attack:
        again = next(pair for pair in items if pair[0].name == attack["reserve"])
        at = next(n for n, (i, _) in enumerate(items) if i.name == attack["after"]) + 1
        items.insert(at, (copy.copy(again[0]), again[1]))
    if "swap" in attack:
        older = dict((i.name, (i, d)) for i, d in members(real("dump", attack["from"], *rest[1:])))
        items = [older[i.name] if i.name == attack["swap"] else (i, d) for i, d in items]
    try:
        for item in items:  # one member at a time: the same bytes as serialise(items)
            sys.stdout.buffer.write(serialise([item]))
            sys.stdout.flush()
            if item[0].name.endswith(".enc"):
                time.sleep(attack.get("slow", 0))
    except BrokenPipeError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
