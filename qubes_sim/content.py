"""Deterministic, realistic disk content: what `init` writes and what `mutate` changes.

Real volumes mix zero runs (sparse holes), text, executables/libraries, already-compressed
media and regions duplicated inside and across images. Everything is derived from a seed so a
world is reproducible byte for byte.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

BLOCK = 4096
REGION = 64 * 1024
WORDS = [
    "qubes",
    "template",
    "private",
    "volume",
    "kernel",
    "package",
    "library",
    "config",
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "with",
    "as",
    "was",
    "on",
    "be",
    "at",
    "by",
    "this",
    "had",
    "not",
    "are",
    "but",
    "from",
    "or",
    "have",
    "an",
    "they",
    "which",
    "one",
    "you",
    "were",
    "her",
    "all",
    "she",
    "there",
    "would",
    "their",
    "we",
    "him",
    "been",
    "has",
    "when",
    "who",
    "will",
    "more",
    "no",
    "if",
    "out",
    "so",
    "said",
    "what",
    "up",
    "its",
    "about",
]


def _text_block(rng: random.Random, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
        out += line.encode() + b"\n"
    return bytes(out[:size])


def _binary_block(rng: random.Random, size: int) -> bytes:
    """Executable-like: random bytes with structure (repeated opcode-ish runs, zero padding)."""
    out = bytearray(rng.randbytes(size))
    for _ in range(size // 512):
        at = rng.randrange(0, max(1, size - 64))
        run = rng.randint(8, 48)
        out[at : at + run] = bytes(len(out[at : at + run]))
    return bytes(out[:size])


class ContentMaker:
    """Makes region contents; keeps a small pool of earlier regions to duplicate from."""

    def __init__(self, seed: int, mix: dict[str, float]) -> None:
        self.rng = random.Random(seed)
        self.mix = mix
        self.pool: list[bytes] = []

    def region(self, size: int = REGION) -> bytes | None:
        """One region of content, or None for a zero run (a hole in the sparse image)."""
        kind = self.rng.choices(list(self.mix), weights=list(self.mix.values()))[0]
        if kind == "zero":
            return None
        if kind == "dup" and self.pool:
            src = self.rng.choice(self.pool)
            return (src * (size // len(src) + 1))[:size]
        if kind == "text":
            data = _text_block(self.rng, size)
        elif kind == "binary":
            data = _binary_block(self.rng, size)
        else:  # "media": already compressed, incompressible
            data = self.rng.randbytes(size)
        if len(self.pool) < 64 and self.rng.random() < 0.2:
            self.pool.append(data)
        return data


MIXES = {
    "root": {"zero": 0.30, "binary": 0.35, "text": 0.15, "media": 0.05, "dup": 0.15},
    "private": {"zero": 0.35, "text": 0.25, "media": 0.25, "binary": 0.05, "dup": 0.10},
}


def write_image(path: Path, size: int, seed: int, mix_name: str) -> None:
    """A sparse image file: zero regions are holes, as on a thin/sparse volume."""
    maker = ContentMaker(seed, MIXES[mix_name])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, REGION):
            data = maker.region(min(REGION, size - offset))
            if data is not None:
                f.seek(offset)
                f.write(data)


def write_home_files(home: Path, seed: int, count: int, max_size: int) -> None:
    rng = random.Random(seed)
    maker = ContentMaker(seed + 1, {"text": 0.6, "media": 0.3, "binary": 0.1})
    for i in range(count):
        sub = home / rng.choice(["Documents", "Pictures", ".config/qubes", "bin", ""])
        sub.mkdir(parents=True, exist_ok=True)
        size = rng.randint(100, max_size)
        data = maker.region(size) or b""
        (sub / f"file{i:03d}{rng.choice(['.txt', '.png', '.conf', '.sh'])}").write_bytes(data)


def mutate_image(path: Path, percent: float, rng: random.Random) -> None:
    """Realistic change to a disk image: rewritten block runs, data inserted (a region shifted
    forward, as when a file grows in place), and data appended (the volume grew)."""
    size = path.stat().st_size
    blocks = size // BLOCK
    target = int(blocks * percent / 100)
    with open(path, "r+b") as f:
        written = 0
        # Real writes cluster (a package's files, a database, the journal): runs of 64 KiB-1 MiB.
        while written < target:
            run = min(rng.randint(16, 256), target - written)
            at = rng.randrange(0, max(1, blocks - run)) * BLOCK
            f.seek(at)
            f.write(rng.randbytes(run * BLOCK))
            written += run
        # insertion: shift one region forward by a few blocks, new data in the gap
        if size > 4 * REGION:
            at = rng.randrange(0, size - 2 * REGION) // BLOCK * BLOCK
            shift = rng.randint(1, 4) * BLOCK
            f.seek(at)
            region = f.read(REGION)
            f.seek(at + shift)
            f.write(region[: max(0, size - at - shift)])
            f.seek(at)
            f.write(rng.randbytes(shift))
        # append: grow the volume by a few blocks of new data
        f.seek(0, os.SEEK_END)
        f.write(rng.randbytes(rng.randint(1, 8) * BLOCK))
