"""Terminal output: human sizes, a progress line (percent, bytes, rate, ETA), --json printing."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
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
    """The result; with --progress, one line like the progress lines before it (JSON Lines)."""
    print(json.dumps(data, indent=None if FORCED else 2, sort_keys=True))


class Progress:
    """A one-line progress display on a terminal (stderr), silent when stderr is not a terminal or
    with --json; --progress draws it anyway: text lines, or with --json one JSON line per second on
    stdout, before the result (docs/json/progress.schema.json)."""

    def __init__(self, action: str, qubes: list[str], as_json: bool) -> None:
        self.action, self.qubes, self.as_json = action, qubes, as_json
        self.label = f"{action} {', '.join(qubes)[:60]}"
        self.tty = sys.stderr.isatty() and not as_json
        self.enabled = not QUIET and (self.tty or FORCED)
        self.start, self.last_draw, self.finished = time.monotonic(), -1.0, False

    def update(self, percent: float, done_bytes: int | Callable[[], int] | None = None) -> None:
        """`done_bytes`: a count, or what gives it (read only when a line is drawn)."""
        now, percent = time.monotonic(), min(percent, 100.0)
        throttled = now - self.last_draw < (0.2 if self.tty else 1) and percent < 100
        if not self.enabled or throttled or self.finished:
            return
        self.last_draw, elapsed, self.finished = now, now - self.start, percent >= 100
        eta = round(elapsed * (100 - percent) / percent) if 0 < percent < 100 else None
        done_bytes = done_bytes() if callable(done_bytes) else done_bytes
        rate = None if done_bytes is None else int(done_bytes / max(elapsed, 0.1))
        if self.as_json:
            line = {"message_type": "progress", "action": self.action, "qube_names": self.qubes,
                    "percent": round(percent, 1), "bytes_done": done_bytes, "bytes_per_second": rate,
                    "seconds": round(elapsed, 1), "eta_seconds": eta}  # fmt: skip
            print(json.dumps(line, sort_keys=True), flush=True)
            return
        parts = [f"{self.label}: {percent:5.1f}%"]
        if done_bytes is not None:
            parts.append(f"{human_bytes(done_bytes)} ({human_bytes(rate)}/s)")
        if eta is not None:
            parts.append(f"ETA {human_duration(eta)}")
        sys.stderr.write(("\r" + "  ".join(parts) + "\x1b[K") if self.tty else "  ".join(parts) + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        self.finished = True
        if self.enabled and self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


FORCED = False  # --progress: draw progress off a terminal too (JSON lines with --json)
QUIET = False  # set by the command line (-q): errors and warnings only


def warn(message: str) -> None:
    """A warning on stderr; -q does not hide it."""
    print(f"qtb-pipe: warning: {message}", file=sys.stderr)


def info(message: str, quiet: bool = False) -> None:
    if not (quiet or QUIET):
        print(message, file=sys.stderr)
