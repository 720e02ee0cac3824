"""`qtb-adapter ping`: healthchecks.io-style monitoring, sent from the backup qube because dom0 has
no network. dom0 calls it at the start of a backup run and with its outcome; the URL (which holds
the check's secret) stays in this qube. A ping never blocks or fails a backup: it is bounded by a
timeout, and a failure to reach the server is a warning, not an error."""

from __future__ import annotations

import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from . import __version__

# healthchecks.io's endpoints: the check's URL is success, /start and /fail the other two
PING_SUFFIX = {"start": "/start", "success": "", "fail": "/fail"}
MAX_BODY_BYTES = 10_000  # healthchecks keeps the first 10 kB of a ping's body
PING_URL_RE = re.compile(r"https?://[^\s\x00-\x1f\x7f]{1,2000}")
DEFAULT_TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class Monitoring:
    """The `[monitoring]` table of adapter.toml."""

    ping_url: str | None = None
    timeout: int = DEFAULT_TIMEOUT_SECONDS


def where(url: str) -> str:
    """The server only: the URL's path is the check's secret, which stays out of logs and dom0."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def ping(monitoring: Monitoring, state: str, body: bytes) -> dict[str, Any]:
    result: dict[str, Any] = {"state": state, "sent": False, "warnings": []}
    if monitoring.ping_url is None:
        result["reason"] = "no [monitoring] ping_url configured"
        return result
    request = urllib.request.Request(
        monitoring.ping_url.rstrip("/") + PING_SUFFIX[state],
        data=body[:MAX_BODY_BYTES],
        headers={"User-Agent": f"qtb-adapter/{__version__}"},
        method="POST",
    )
    result["server"] = where(monitoring.ping_url)
    try:
        with urllib.request.urlopen(request, timeout=monitoring.timeout) as response:
            result.update(sent=True, status=response.status)
    except (urllib.error.URLError, OSError, ValueError) as exc:  # HTTPError is a URLError
        reason = getattr(exc, "reason", None) or exc
        result["warnings"].append(f"monitoring ping ({state}) to {result['server']} failed: {reason}")
    return result
