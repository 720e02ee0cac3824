"""Terminal output: human sizes, a progress line (percent, ETA), --json printing."""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def short_id(snapshot_id: str) -> str:
    """restic's 64-hex ids shortened as restic does (12 characters, a prefix `restore` accepts);
    borg's archive names (qtb-s-<time>-<run>) share their first characters, so they stay whole."""
    return snapshot_id[:12] if len(snapshot_id) == 64 else snapshot_id


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


class Progress:
    """A one-line progress display on a terminal; silent when stderr is not a terminal or --json."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled = label, enabled and not QUIET and sys.stderr.isatty()
        self.start, self.last_draw = time.monotonic(), 0.0

    def update(self, percent: float, done_bytes: int | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last_draw < 0.2 and percent < 100:
            return
        self.last_draw = now
        elapsed = now - self.start
        parts = [f"{self.label}: {percent:5.1f}%"]
        if done_bytes is not None:
            parts.append(f"{human_bytes(done_bytes)} ({human_bytes(done_bytes / max(elapsed, 0.1))}/s)")
        if 0 < percent < 100:
            parts.append(f"ETA {human_duration(elapsed * (100 - percent) / percent)}")
        sys.stderr.write("\r" + "  ".join(parts) + "\x1b[K")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


QUIET = False  # set by the command line (-q): errors and warnings only


def info(message: str, quiet: bool = False) -> None:
    if not (quiet or QUIET):
        print(message, file=sys.stderr)
