"""keep-last/daily/weekly/monthly/yearly, computed here once for every engine, per qube.

Engines cannot apply their own policies: restic's and borg's would count pending snapshots and our
commit objects. Semantics are restic's (and borg's): for each rule, walk snapshots newest first and
keep the newest one of each period until the rule's count is used up; a snapshot is kept when any
rule keeps it. Periods are in local time.

Users think in qubes, and each run commits one snapshot per qube: the rules apply to each protected
qube's own copies (`per_qube`; dom0 passes the qubes that still exist), a snapshot goes only when no
qube keeps it, and the newest copy of a protected qube stays whatever the rules say. A qube deleted
from dom0 has no new copies to push its old ones out, so counting periods in its own history would
keep its last copy forever; counting it among all snapshots would drop it at once (other qubes'
snapshots are newer in the same night). Its periods are the repository's instead: of the rule's N
newest periods holding any snapshot, it keeps its newest copy in each, so its copies age out as
newer nights arrive (keep-daily 7: seven more days with backups). This is also restic's rule for
one history: `apply_policy` is the case where the copies are the whole timeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class KeepPolicy:
    last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    @property
    def empty(self) -> bool:
        return not any((self.last, self.daily, self.weekly, self.monthly, self.yearly))

    def as_dict(self) -> dict[str, int]:
        return {
            "keep_last": self.last,
            "keep_daily": self.daily,
            "keep_weekly": self.weekly,
            "keep_monthly": self.monthly,
            "keep_yearly": self.yearly,
        }


@dataclass(frozen=True)
class Dated:
    id: str
    time: datetime


def _rules(policy: KeepPolicy) -> list[tuple[int, Callable[[datetime], object] | None]]:
    return [
        (policy.last, None),  # None: every snapshot is a period of its own
        (policy.daily, lambda t: (t.year, t.month, t.day)),
        (policy.weekly, lambda t: t.isocalendar()[:2]),
        (policy.monthly, lambda t: (t.year, t.month)),
        (policy.yearly, lambda t: t.year),
    ]


def _key(snap: Dated, period: Callable[[datetime], object] | None) -> object:
    return snap.id if period is None else period(snap.time.astimezone())


def recent_periods(
    snapshots: Sequence[Dated], policy: KeepPolicy
) -> list[tuple[Callable[[datetime], object] | None, set[object]]]:
    """Per rule, the keys of its `count` newest periods that hold any of these snapshots."""
    ordered = sorted(snapshots, key=lambda s: s.time, reverse=True)
    recent = []
    for count, period in _rules(policy):
        keys = list(dict.fromkeys(_key(s, period) for s in ordered))
        recent.append((period, set(keys[:count])))
    return recent


def newest_in_periods(
    copies: Sequence[Dated], recent: list[tuple[Callable[[datetime], object] | None, set[object]]]
) -> list[Dated]:
    """The newest of these copies in each of the given periods, newest first."""
    ordered = sorted(copies, key=lambda s: s.time, reverse=True)
    kept: set[str] = set()
    for period, keys in recent:
        seen: set[object] = set()
        for snap in ordered:
            key = _key(snap, period)
            if key in keys and key not in seen:
                kept.add(snap.id)
                seen.add(key)
    return [s for s in ordered if s.id in kept]


def apply_policy(snapshots: Sequence[Dated], policy: KeepPolicy) -> tuple[list[Dated], list[Dated]]:
    """(keep, remove), both newest first."""
    keep = newest_in_periods(snapshots, recent_periods(snapshots, policy))
    ordered = sorted(snapshots, key=lambda s: s.time, reverse=True)
    return keep, [s for s in ordered if s not in keep]


@dataclass(frozen=True)
class Copies:
    """A complete snapshot and the qubes it holds (from its commit object)."""

    id: str
    time: datetime
    qubes: tuple[str, ...]


def per_qube(
    snapshots: Sequence[Copies],
    policy: KeepPolicy,
    protected: set[str] | None,
    recorded: set[str] | None = None,
) -> tuple[list[Copies], list[Copies], dict[str, list[str]]]:
    """(keep, remove, what each qube keeps newest first). `protected` None: every qube is.
    `recorded` (None: every snapshot) are the snapshots dom0 holds a record of: only those count as a
    protected qube's own copies, since dom0 restores only from what it recorded. A snapshot committed
    without a record (the run died between the two) cannot push a qube's recorded copy out. A qube
    with no recorded copy at all (a new dom0) counts all. Unrecorded copies, and a deleted qube's,
    are kept by the repository's recent periods (see the module's docstring)."""
    recent = recent_periods([Dated(s.id, s.time) for s in snapshots], policy)  # the repository's
    kept: dict[str, list[str]] = {}
    for qube in sorted({q for s in snapshots for q in s.qubes}):
        copies = [Dated(s.id, s.time) for s in snapshots if qube in s.qubes]
        own = [d for d in copies if recorded is None or d.id in recorded] or copies
        if protected is not None and qube not in protected:
            kept[qube] = [d.id for d in newest_in_periods(copies, recent)]  # ages out
            continue
        keep, _ = apply_policy(own, policy)
        newest = max(own, key=lambda d: d.time)
        if newest not in keep:
            keep.append(newest)  # a qube's newest copy is never lost to retention
        keep += newest_in_periods([d for d in copies if d not in own], recent)
        kept[qube] = [d.id for d in sorted(keep, key=lambda d: d.time, reverse=True)]
    keep_ids = {i for ids in kept.values() for i in ids} | {s.id for s in snapshots if not s.qubes}
    ordered = sorted(snapshots, key=lambda s: s.time, reverse=True)
    return [s for s in ordered if s.id in keep_ids], [s for s in ordered if s.id not in keep_ids], kept
