"""prune works on complete snapshots only; drop-pending removes pending ones; the keep policy."""

from __future__ import annotations

import secrets
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest_remote import ENGINE_PASSWORD, AdapterHome
from qtb_adapters.retention import Copies, Dated, KeepPolicy, apply_policy, per_qube
from streamtools import make_backup, write_stream


def _days(*offsets: float) -> list[Dated]:
    base = datetime(2026, 6, 17, 12, 0, tzinfo=UTC)  # a Wednesday
    return [Dated(f"s{i}", base - timedelta(days=o)) for i, o in enumerate(offsets)]


@pytest.fixture
def utc_local_time(monkeypatch):
    """Keep periods are in local time: pin it, and restore it afterwards."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_keep_last_daily_weekly_monthly_yearly(utc_local_time) -> None:
    snaps = _days(0, 0.1, 1, 2, 3, 9, 40, 400)
    keep, remove = apply_policy(snaps, KeepPolicy(last=1))
    assert [s.id for s in keep] == ["s0"] and len(remove) == 7
    keep, _ = apply_policy(snaps, KeepPolicy(daily=3))
    assert [s.id for s in keep] == ["s0", "s2", "s3"]  # newest of each of the last 3 days with backups
    keep, _ = apply_policy(snaps, KeepPolicy(monthly=2, yearly=2))
    assert {s.id for s in keep} == {"s0", "s6", "s7"}
    keep, _ = apply_policy(snaps, KeepPolicy(last=2, weekly=2))
    assert {s.id for s in keep} == {"s0", "s1", "s4"}  # s4 is the Sunday of the week before
    assert apply_policy([], KeepPolicy(daily=1)) == ([], [])


def _runs() -> list[Copies]:
    """The issue's case: two full runs, `backup work vault`, `backup -x personal -x debian-12`, then
    `backup sys-net`, one day apart."""
    every = ("work", "vault", "personal", "debian-12", "sys-net")
    held = [every, every, ("work", "vault"), ("work", "vault", "sys-net"), ("sys-net",)]
    base = datetime(2026, 6, 17, 12, 0, tzinfo=UTC)
    return [Copies(f"s{i}", base - timedelta(days=4 - i), q) for i, q in enumerate(held)]


def _ids(copies: list[Copies]) -> list[str]:
    return [c.id for c in copies]


def test_per_qube_keeps_every_qubes_only_copy(utc_local_time) -> None:
    keep, remove, kept = per_qube(_runs(), KeepPolicy(last=1), None)
    # one policy over all runs would keep s4 alone and lose personal and debian-12
    assert _ids(keep) == ["s4", "s3", "s1"] and _ids(remove) == ["s2", "s0"]
    assert kept == {
        "work": ["s3"],
        "vault": ["s3"],
        "personal": ["s1"],
        "debian-12": ["s1"],
        "sys-net": ["s4"],
    }
    _, remove, kept = per_qube(_runs(), KeepPolicy(last=2), None)
    assert _ids(remove) == [] and kept["sys-net"] == ["s4", "s3"] and kept["personal"] == ["s1", "s0"]
    # a snapshot whose commit names no qube is not anyone's to remove
    empty = Copies("e", datetime(2026, 1, 1, tzinfo=UTC), ())
    keep, remove, _ = per_qube([*_runs(), empty], KeepPolicy(last=1), None)
    assert "e" in _ids(keep) and "e" not in _ids(remove)


def test_per_qube_ages_out_a_qube_deleted_from_dom0(utc_local_time) -> None:
    still_there = {"work", "vault", "debian-12", "sys-net"}  # personal was deleted in dom0
    # keep-daily 4 keeps s1..s4 among all runs: personal's copy in s1 is still within the rules,
    # its older one is not (debian-12, still there, keeps both in its own history)
    _, remove, kept = per_qube(_runs(), KeepPolicy(daily=4), still_there)
    assert kept["personal"] == ["s1"] and kept["debian-12"] == ["s1", "s0"] and _ids(remove) == []
    # keep-last 1 keeps s4 among all runs: personal's copies have aged out; debian-12 keeps s1
    keep, remove, kept = per_qube(_runs(), KeepPolicy(last=1), still_there)
    assert kept["personal"] == [] and kept["debian-12"] == ["s1"]
    assert _ids(keep) == ["s4", "s3", "s1"] and _ids(remove) == ["s2", "s0"]
    # once debian-12 is gone too, nothing holds s1
    _, remove, kept = per_qube(_runs(), KeepPolicy(last=1), still_there - {"debian-12"})
    assert kept["debian-12"] == [] and _ids(remove) == ["s2", "s1", "s0"]


def test_a_deleted_qubes_copies_age_out_by_the_nights_not_at_once(utc_local_time) -> None:
    """One snapshot per qube a night: counted among all snapshots, the copy of a qube deleted
    yesterday was never the newest of its day and went at the next prune. Its days are the
    repository's days with backups: kept until that many newer days have backups."""
    base = datetime(2026, 6, 17, 1, 0, tzinfo=UTC)
    nights = [  # work and vault every night (vault last), personal until night 0 only
        Copies(f"n{night}-{qube}", base + timedelta(days=night, minutes=minute), (qube,))
        for night in range(9)
        for minute, qube in enumerate(("personal", "work", "vault"))
        if qube != "personal" or night == 0
    ]
    policy = KeepPolicy(daily=7)
    _, _, kept = per_qube(nights[:6], policy, {"work", "vault"})  # nights 0 and 1
    assert kept["personal"] == ["n0-personal"]
    _, remove, kept = per_qube(nights[: 3 + 2 * 6], policy, {"work", "vault"})  # 7 nights
    assert kept["personal"] == ["n0-personal"] and "n0-personal" not in _ids(remove)
    _, remove, kept = per_qube(nights, policy, {"work", "vault"})  # 9 nights: night 0 is out of 7 days
    assert kept["personal"] == [] and "n0-personal" in _ids(remove)
    # the copies of qubes still there are their own: each keeps its 7 newest nights
    assert kept["work"] == [f"n{n}-work" for n in range(8, 1, -1)]


def test_per_qube_counts_only_copies_dom0_recorded(utc_local_time) -> None:
    """A run that died between the commit and dom0's record leaves a snapshot dom0 cannot restore
    from (its manifest hash is not recorded): it must not push out the qube's recorded copy."""
    base = datetime(2026, 6, 17, 12, 0, tzinfo=UTC)
    runs = [
        Copies("s0", base, ("work", "vault")),
        Copies("s1", base + timedelta(hours=1), ("work",)),  # committed, no record in dom0
    ]
    keep, remove, kept = per_qube(runs, KeepPolicy(last=1), {"work", "vault"}, {"s0"})
    # without `recorded`, s1 would be work's newest copy and keep-last 1 would remove s0
    assert per_qube(runs, KeepPolicy(last=1), {"work", "vault"})[2]["work"] == ["s1"]
    assert kept["work"] == ["s1", "s0"] and _ids(keep) == ["s1", "s0"] and remove == []
    # the unrecorded snapshot ages out by the timeline; the recorded copy stays
    later = [*runs, Copies("s2", base + timedelta(hours=2), ("vault",))]
    keep, remove, kept = per_qube(later, KeepPolicy(last=1), {"work", "vault"}, {"s0", "s2"})
    assert kept["work"] == ["s0"] and _ids(keep) == ["s2", "s0"] and _ids(remove) == ["s1"]
    # a qube with no recorded copy at all (a new dom0) counts every copy it has
    _, remove, kept = per_qube(later, KeepPolicy(last=1), {"work", "vault"}, {"s2"})
    assert kept["work"] == ["s1"] and _ids(remove) == ["s0"]


@pytest.mark.parametrize("engine", ["restic", "borg"])
def test_prune_ignores_pending_and_drop_pending_removes_them(engine: str, tmp_path: Path) -> None:
    backup = make_backup(51, volumes={"vm1/private.img": 200_000}, chunk_bytes=64 * 1024)
    stream = write_stream(backup, tmp_path / "stream", tmp_path / "work")
    home = AdapterHome(tmp_path / "qube")
    home.init(engine, str(tmp_path / "repo"))
    complete = []
    for _ in range(3):
        run = "run" + secrets.token_hex(6)
        home.ok("store", "--run", run, stdin=stream.path)
        complete.append(home.ok("commit", "--run", run, "--json", stdin=backup.manifest(engine)).json()["id"])
    pending_run = "run" + secrets.token_hex(6)
    pending_id = home.ok("store", "--run", pending_run, "--json", stdin=stream.path).json()["id"]

    assert home.run("prune").returncode == 2  # no policy: refuse rather than delete everything
    dry = home.ok("prune", "--keep-last", "1", "--dry-run", "--json").json()
    assert dry["keep"] == [complete[-1]] and sorted(dry["remove"]) == sorted(complete[:-1])
    # the policy from the config: [retention], as dom0 names it; [prune], its old name, still read
    text = home.config_path.read_text()
    home.config_path.write_text(text + "\n[retention]\nkeep_last = 1\n")
    assert home.ok("prune", "--dry-run", "--json").json()["keep"] == [complete[-1]]
    home.config_path.write_text(text + "\n[prune]\nkeep_last = 1\n")
    old_name = home.run("prune", "--dry-run", "--json")
    assert old_name.returncode == 0 and old_name.json()["keep"] == [complete[-1]]
    assert "[prune] is now called [retention]" in old_name.stderr
    home.config_path.write_text(text + "\n[prune]\nkeep_last = 1\n[retention]\nkeep_last = 2\n")
    assert home.run("prune", "--dry-run").returncode == 3
    home.config_path.write_text(text)
    assert len(home.snapshots()) == 3
    # A snapshot the last listing saw complete is dumped without listing the repository again.
    traced = home.run("dump", complete[0], env={"QTB_ADAPTER_DEBUG": "1"})
    assert traced.returncode == 0 and traced.stdout[:512] != bytes(512)
    engine_runs = [line for line in traced.stderr.splitlines() if "version" not in line]
    assert len(engine_runs) == 1 and (" dump " in engine_runs[0] or " export-tar " in engine_runs[0])
    pruned = home.ok("prune", "--keep-last", "1", "--json").json()
    assert home.run("dump", complete[0]).returncode == 4  # deleted: no longer served from the cache
    assert pending_id not in pruned["keep"] + pruned["remove"]
    assert [s["id"] for s in home.snapshots()] == [complete[-1]]
    assert [s["id"] for s in home.snapshots(pending=True) if s["state"] == "pending"] == [pending_id]

    # A fresh pending snapshot survives the default age limit; --run drops it.
    assert home.ok("drop-pending", "--json").json()["dropped"] == []
    assert home.ok("pending", "--json").json()["pending"][0]["id"] == pending_id
    dropped = home.ok("drop-pending", "--run", pending_run, "--json").json()["dropped"]
    assert [d["id"] for d in dropped] == [pending_id]
    assert home.run("pending", "--run", pending_run).returncode == 4
    assert [s["id"] for s in home.snapshots(pending=True)] == [complete[-1]]
    subset = "1/2" if engine == "restic" else "last=1"  # a data subset, as each engine spells it
    assert home.ok("check", "--read-data-subset", subset, "--json").json() | {"output": ""} == {
        "ok": True,
        "read_data": subset,
        "output": "",
        "warnings": [],
    }
    assert home.ok("dump", complete[-1]).stdout[:512] != bytes(512)

    # Deleted behind the adapter's back (the last listing cached it as complete): a clean exit 4.
    if engine == "restic":
        argv = ["restic", "--repo", str(tmp_path / "repo"), "--password-file", str(home.password_file)]
        subprocess.run([*argv, "forget", complete[-1]], env=home.env, capture_output=True, check=True)
    else:
        env = {**home.env, "BORG_PASSPHRASE": ENGINE_PASSWORD}
        subprocess.run(["borg", "delete", f"{tmp_path / 'repo'}::{complete[-1]}"], env=env, check=True)
    gone = home.run("dump", complete[-1])
    assert gone.returncode == 4 and gone.stdout == b"", gone.stderr
    assert home.run("manifest", complete[-1]).returncode == 4
