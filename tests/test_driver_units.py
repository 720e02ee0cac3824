"""Driver logic that needs no emulated world."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from qtb_pipe import proc, qubes
from qtb_pipe.actions import restore as restore_action
from qtb_pipe.actions.backup import check_run
from qtb_pipe.actions.restore import (
    refuse_another_users_home,
    refuse_short_of_pool_space,
    refuse_short_of_space,
    resolve_snapshot_id,
    restore_order,
    run_restore_latest,
    unpacker_refusal,
)
from qtb_pipe.adapter import Adapter, Member
from qtb_pipe.config import (
    Config,
    config_path,
    format_recovery_key,
    generate_secret,
    load_config,
    parse_recovery_key,
)
from qtb_pipe.errors import EXIT_FAILED, QtbError
from qtb_pipe.manifest import Manifest, QubeEntry
from qtb_pipe.proc import Result
from qtb_pipe.qubes import QUBES_XML_RETRIEVAL_CAP, qubes_xml_too_big
from qtb_pipe.records import SnapshotRecord, catalog, record_path, records_dir, save_record
from qtb_pipe.runs import ShimRecord
from scrypt_shim import shim

BID = "20261124T010203-42"


def records() -> list[ShimRecord]:
    return [
        ShimRecord("enc", "backup-header", "ok", 120, "aa" * 32, BID),
        ShimRecord("enc", "qubes.xml.000", "ok", 5000, "bb" * 32, BID),
        ShimRecord("enc", "vm3/private.img.000", "ok", 9000, "cc" * 32, BID),
    ]


def stored() -> list[Member]:
    return [
        Member("backup-header", 120),
        Member("backup-header.hmac", 176),
        Member("qubes.xml.000.enc", 5056),
        Member("vm3/private.img.000.enc", 9056),
    ]


def test_qubes_xml_over_the_restore_cap_is_said():
    """The cap is on what is sent: the sealed chunk, its trailer included."""
    chunk = {"path": "qubes.xml.000", "tag": "0" * 64}
    limit = QUBES_XML_RETRIEVAL_CAP - shim.TRAILER_SIZE
    volume = {"path": "vm3/private.img.000", "size": 1 << 30, "tag": "1" * 64}
    assert qubes_xml_too_big([{**chunk, "size": limit}, volume]) is None
    assert "1 MiB" in qubes_xml_too_big([{**chunk, "size": limit + 1}])


def test_check_run_accepts_exact_match_and_refuses_any_difference():
    assert check_run(records(), stored()) == BID
    with pytest.raises(QtbError, match="does not match"):
        check_run(records(), [*stored()[:3], Member("vm3/private.img.000.enc", 9057)])
    with pytest.raises(QtbError, match="does not match"):
        check_run(records(), [*stored(), Member("vm3/private.img.001.enc", 10)])  # stored without a record
    failed = [*records()[:2], ShimRecord("enc", "vm3/private.img.000", "failed", error="killed")]
    with pytest.raises(QtbError, match="shim failed"):
        check_run(failed, stored())


def test_unique_prefix_of_a_recorded_snapshot_stands_for_its_id(tmp_path, monkeypatch):
    monkeypatch.setenv("QTB_PIPE_ROOT", str(tmp_path))
    for sid, engine in (("abcdef0123", "restic"), ("abcdef0199", "restic"), ("abcdef7777", "borg")):
        save_record(SnapshotRecord(sid, engine, BID, "2026-11-24T00:00:00+00:00", ["work"], 1, "00" * 32))
    assert resolve_snapshot_id("restic", "abcdef01") == "abcdef01"  # ambiguous: left to the adapter
    assert resolve_snapshot_id("restic", "abcdef012") == "abcdef0123"
    assert resolve_snapshot_id("restic", "abcdef77") == "abcdef77"  # another engine's snapshot
    assert resolve_snapshot_id("borg", "abcdef77") == "abcdef7777"
    assert resolve_snapshot_id("borg", "abcdef7") == "abcdef7"  # under 8 characters: never expanded


@pytest.mark.parametrize(
    "change",
    [
        {"time": 5},
        {"time": "yesterday"},
        {"time": "2026-11-24"},
        {"stream_bytes": "1"},
        {"qubes": "work"},
        {"qubes": {"work": 5}},
        {"backup_id": None},
        {"manifest_sha256": []},
    ],
)
def test_a_record_of_the_wrong_shape_is_damaged_not_an_internal_error(tmp_path, monkeypatch, change):
    """Valid JSON with a field of another type crashed the catalog (TypeError: internal error, exit
    1) or, a time in another format, sorted as any qube's newest copy."""
    monkeypatch.setenv("QTB_PIPE_ROOT", str(tmp_path))
    good = SnapshotRecord("a" * 64, "restic", BID, "2026-11-24T00:00:00+00:00", {"work": None}, 1, "00" * 32)
    save_record(good)
    assert catalog("restic")["work"] == [good]
    path = record_path("restic", good.id)
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(QtbError) as refused:
        catalog("restic")
    assert refused.value.code == 3 and path.name in str(refused.value)


def test_a_record_is_never_replaced_by_one_with_another_manifest(tmp_path, monkeypatch):
    """14.1, the last line of defence: a commit answered with an older snapshot's id that got past
    backup's checks still cannot overwrite that snapshot's record (the same manifest may be saved
    again: a retried save after a lost answer)."""
    monkeypatch.setenv("QTB_PIPE_ROOT", str(tmp_path))
    old = SnapshotRecord("a" * 64, "restic", BID, "2026-11-24T00:00:00+00:00", {"work": None}, 1, "00" * 32)
    save_record(old)
    before = record_path("restic", old.id).read_bytes()
    save_record(old)
    with pytest.raises(QtbError, match=r"already has a record of snapshot a+ with another manifest") as e:
        save_record(
            SnapshotRecord(old.id, "restic", BID, "2026-12-07T00:00:00+00:00", {"work": None}, 2, "11" * 32)
        )
    assert e.value.code == 5 and record_path("restic", old.id).read_bytes() == before


def test_a_record_that_cannot_be_written_names_its_file(tmp_path, monkeypatch):
    """A full disk's write error has no file name: write_private says which file, and leaves none."""
    monkeypatch.setenv("QTB_PIPE_ROOT", str(tmp_path))
    folder = records_dir()
    folder.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)], check=True)
    try:
        (folder / ".filler").write_bytes(bytes(16 * 1024))
        with pytest.raises(QtbError, match=r"cannot write .*/restic-abcdef0123\.json: No space left") as e:
            save_record(
                SnapshotRecord(
                    "abcdef0123", "restic", BID, "2026-11-24T00:00:00+00:00", {"work": None}, 1, "0" * 64
                )
            )
        assert e.value.code == EXIT_FAILED and [p.name for p in folder.iterdir()] == [".filler"]
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_recovery_key_carries_a_check_group_that_catches_a_mistyped_digit():
    secret = generate_secret()
    key = format_recovery_key(secret)
    assert len(key.split("-")) == 9 and parse_recovery_key(key.upper().replace("-", " ")) == secret
    assert parse_recovery_key(secret) == secret  # a key of 0.1 (no check group) is taken as it is
    for wrong in (key[:-1] + ("0" if key[-1] != "0" else "1"), ("1" if key[0] != "1" else "2") + key[1:]):
        with pytest.raises(QtbError, match="mistyped") as e:
            parse_recovery_key(wrong)
        assert e.value.code == 2
    for bad in (key[:-2], key + "00", "g" * 72):
        with pytest.raises(QtbError, match="9 groups"):
            parse_recovery_key(bad)


GOOD_INFO = {"engine": "borg", "version": "1.2.4", "repository": "/r", "password": "pw", "key_export": "K\n1"}


def answering(monkeypatch, answer: object) -> None:
    monkeypatch.setattr(qubes, "run_in_qube", lambda *a, **k: Result(0, json.dumps(answer).encode(), b""))


@pytest.mark.parametrize(
    "answer",
    [
        {**GOOD_INFO, "engine": "restic"},  # not the engine asked for
        {**GOOD_INFO, "password": "pw\nqtb-pipe init --force"},  # a second line on the sheet
        {**GOOD_INFO, "repository": "/r\x1b[2J"},  # terminal control
        {**GOOD_INFO, "password": "x" * 1001},
        {**GOOD_INFO, "key_export": 7},
        {k: v for k, v in GOOD_INFO.items() if k != "password"},
        [GOOD_INFO],
    ],
)
def test_recovery_info_answers_are_bounded_and_printable(monkeypatch, answer):
    answering(monkeypatch, GOOD_INFO)
    assert Adapter("backup", "borg").recovery_info()["key_export"] == "K\n1"
    answering(monkeypatch, answer)
    with pytest.raises(QtbError, match="backup qube sent"):
        Adapter("backup", "borg").recovery_info()


GOOD_SNAPSHOT = {
    "id": "a" * 64,
    "state": "complete",
    "time": "2026-12-03T01:02:03+00:00",
    "backup_id": BID,
    "qubes": ["work", "dom0"],
    "stream_bytes": 123,
    "added_bytes": None,
}


@pytest.mark.parametrize(
    "entry",
    [
        {**GOOD_SNAPSHOT, "id": "a" * 64 + "\n"},  # fullmatch: no trailing newline
        {**GOOD_SNAPSHOT, "id": "../x y"},
        {**GOOD_SNAPSHOT, "state": "completed"},
        {**GOOD_SNAPSHOT, "time": "2026-12-03\x1b[2J"},
        {**GOOD_SNAPSHOT, "backup_id": "20261124T010203-42;rm"},
        {**GOOD_SNAPSHOT, "qubes": ["work", "-rf"]},
        {**GOOD_SNAPSHOT, "qubes": ["q"] * 1001},
        {**GOOD_SNAPSHOT, "stream_bytes": -1},
        {**GOOD_SNAPSHOT, "stream_bytes": True},
        {k: v for k, v in GOOD_SNAPSHOT.items() if k != "time"},
        "a" * 64,
    ],
)
def test_listing_answers_are_checked_field_by_field(monkeypatch, entry):
    answering(monkeypatch, {"snapshots": [GOOD_SNAPSHOT]})
    (snapshot,) = Adapter("backup", "restic").snapshots()
    assert snapshot.qube_names == ["work", "dom0"] and snapshot.added_bytes is None
    answering(monkeypatch, {"snapshots": [GOOD_SNAPSHOT, entry]})
    with pytest.raises(QtbError, match="backup qube sent malformed data"):
        Adapter("backup", "restic").snapshots()


def test_check_and_prune_answers_are_checked_where_every_answer_is(monkeypatch):
    """adapter.py owns the backup qube's answers: check's text reaches dom0 bounded and printable,
    prune's ids each fully match (and a first prune after years may name many thousands)."""
    warnings = ["disk \x1b[2J90% full\nnext", 7, *(f"w{i}" for i in range(9))]
    answering(monkeypatch, {"ok": True, "output": "x" * 9000, "warnings": warnings})
    passed, output, shown = Adapter("backup", "restic").check()
    assert passed and len(output) == 4000 and shown == ["disk ?[2J90% full next", "w0", "w1", "w2", "w3"]
    answering(monkeypatch, {"ok": "yes"})
    assert Adapter("backup", "restic").check() == (False, "", [])
    ids = [f"{i:064x}" for i in range(20_000)]
    answering(monkeypatch, {"remove": ids})
    assert Adapter("backup", "restic").prune({"keep_last": 1}, True, [], []) == ids
    for answer in ({"remove": [*ids[:3], "bad id!"]}, {"remove": "all"}, {"removed": []}):
        answering(monkeypatch, answer)
        with pytest.raises(QtbError, match="malformed data for `qtb-adapter prune`"):
            Adapter("backup", "restic").prune({"keep_last": 1}, True, [], [])


@pytest.mark.parametrize("name", ["x" * 201, "vm3/private.img.000.enc\n", "", "a b"])
def test_pending_member_names_and_commit_ids_must_fully_match(monkeypatch, name):
    answering(monkeypatch, {"members": [{"name": "vm3/private.img.000.enc", "size": 9056}]})
    assert Adapter("backup", "restic").pending_members("r1") == [Member("vm3/private.img.000.enc", 9056)]
    answering(monkeypatch, {"members": [{"name": name, "size": 1}]})
    with pytest.raises(QtbError, match="malformed"):
        Adapter("backup", "restic").pending_members("r1")
    answering(monkeypatch, {"id": name})
    with pytest.raises(QtbError, match="malformed"):
        Adapter("backup", "restic").commit("r1", b"sealed")


def test_restore_order_puts_templates_and_net_qube_chains_first():
    """qvm-backup-restore refuses a qube whose template or net qube is missing: with one restore per
    snapshot, work -> sys-firewall -> sys-net must come back in that chain's order."""
    qubes_of = {  # snapshot: (qube, class, template, netvm), in the worst order
        "s-dom0": ("dom0", "AdminVM", None, None),
        "s-work": ("work", "AppVM", "debian-12", "sys-firewall"),
        "s-fw": ("sys-firewall", "AppVM", "debian-12", "sys-net"),
        "s-net": ("sys-net", "AppVM", "debian-12", None),
        "s-tpl": ("debian-12", "TemplateVM", None, None),
        "s-vault": ("vault", "AppVM", "debian-12", "gone-net"),  # a net qube not restored here
    }
    manifests = {
        s: Manifest(BID, "2026-11-24T01:02:03+00:00", "restic", {n: QubeEntry(f"{n}/", k, t, v)}, [], b"")
        for s, (n, k, t, v) in qubes_of.items()
    }
    order = restore_order(manifests)
    assert order.index("s-tpl") < order.index("s-net") < order.index("s-fw") < order.index("s-work")
    assert order.index("s-tpl") < order.index("s-vault") and order[-1] == "s-dom0"
    # a loop (each the other's net qube) is no reason to hang: both are still restored
    loop = {n: QubeEntry(f"{n}/", "AppVM", None, m) for n, m in (("a", "b"), ("b", "a"))}
    assert sorted(restore_order({n: replace(manifests["s-net"], qubes={n: loop[n]}) for n in loop})) == [
        "a",
        "b",
    ]


@pytest.mark.parametrize("backed_up_as", ["john.doe", "user"])
def test_the_home_s_user_is_its_chunks_name_dots_and_all(monkeypatch, backed_up_as):
    """dom0-home/USER.000 (the shim's chunk path): a user name may hold dots, the chunk number never."""
    home = QubeEntry("dom0-home/", "AdminVM", None, None)
    chunks = [{"path": f"dom0-home/{backed_up_as}.{n:03}", "size": 1, "tag": "0" * 64} for n in range(2)]
    copy = Manifest(BID, "2026-11-24T01:02:03+00:00", "restic", {"dom0": home}, chunks, b"")
    monkeypatch.setattr(qubes, "dom0_user", lambda: "john.doe")
    if backed_up_as == "john.doe":
        refuse_another_users_home([copy], ["dom0"], qubes.RestoreFlags())  # the same user: no refusal
        return
    with pytest.raises(QtbError, match=r"home in this snapshot is user.s, and this dom0.s user is john\.doe"):
        refuse_another_users_home([copy], ["dom0"], qubes.RestoreFlags())
    for flag in ("skip_dom0_home", "ignore_username_mismatch", "verify_only", "paranoid_mode"):
        refuse_another_users_home([copy], ["dom0"], qubes.RestoreFlags(**{flag: True}))
    refuse_another_users_home([copy], ["work"], qubes.RestoreFlags())  # the home is not restored


def test_a_restore_dom0_s_home_has_no_room_for_is_said_before_any_data(monkeypatch, tmp_path):
    """The unpacker waits without a timeout below its largest file + 500 MiB free (facts R1), the
    tool asks for 1 GiB, and a restored home needs its own size there too; measured at $HOME."""
    monkeypatch.setenv("HOME", str(tmp_path))
    free, asked = [2 << 30], []

    def disk_usage(path):
        asked.append(path)
        return shutil._ntuple_diskusage(4 << 30, (4 << 30) - free[0], free[0])

    monkeypatch.setattr(restore_action.shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(qubes, "default_pool", lambda volume: "")  # no pool to ask: the next test's
    volume = [{"path": "vm3/private.img.000", "size": 100 << 20, "tag": "0" * 64}]
    home = [{"path": f"dom0-home/user.{n:03}", "size": 256 << 20, "tag": "0" * 64} for n in range(8)]
    verify, restore = qubes.RestoreFlags(verify_only=True), qubes.RestoreFlags()
    refuse_short_of_space(volume + home, verify)  # a verify pass: a chunk at a time, no home
    assert asked == [tmp_path]
    needs = (
        r"has 2\.0 GiB free and this restore needs 2\.7 GiB there \(the largest"  # 256 MiB + 500 MiB + 2 GiB
    )
    with pytest.raises(QtbError, match=needs):
        refuse_short_of_space(volume + home, restore)  # the home's 2 GiB on top
    refuse_short_of_space(volume + home, qubes.RestoreFlags(paranoid_mode=True))  # in a disposable
    free[0] = 900 << 20  # more than a chunk and the margin, less than the tool's own 1 GiB
    with pytest.raises(QtbError, match=f"the 1 GiB qvm-backup-restore asks for\\): free space in {tmp_path}"):
        refuse_short_of_space(volume, verify)


def test_a_restore_its_pools_have_no_room_for_is_said_before_any_data(monkeypatch, tmp_path):
    """Facts V8: new volumes go to qubes-prefs' default_pool_<volume>, which the tool never checks;
    each pool must have room for the private and root volumes it gets, as they were backed up."""
    default = {"private": "vm-pool", "root": "vm-pool"}
    pools = {"vm-pool": {"driver": "lvm_thin", "size": str(1 << 30), "usage": str((1 << 30) - (300 << 20))}}
    asked = []
    monkeypatch.setattr(qubes, "default_pool", lambda volume: asked.append(volume) or default[volume])
    monkeypatch.setattr(qubes, "pool_info", lambda pool: dict(pools[pool]))
    chunks = [
        {"path": "vm3/private.img.000", "size": 100 << 20},
        {"path": "vm3/private.img.1000", "size": 100 << 20},  # a volume over 97.7 GiB: 4 digits
        {"path": "vm4/root.img.000", "size": 150 << 20},
        {"path": "dom0-home/user.000", "size": 900 << 20},  # dom0's home: not in a pool
        {"path": "vm3/firewall.xml.000", "size": 900 << 20},
    ]
    with pytest.raises(QtbError, match=r"^pool vm-pool has 300\.0 MiB free and .* need 350\.0 MiB there"):
        refuse_short_of_pool_space(chunks, qubes.RestoreFlags())  # both volumes in one pool
    assert sorted(asked) == ["private", "root"]
    default["root"] = "ssd"  # each pool its own share
    pools["ssd"] = {"driver": "file-reflink", "size": str(400 << 20), "usage": "0", "dir_path": str(tmp_path)}
    monkeypatch.setenv("HOME", str(tmp_path))  # that pool is on dom0's home's file system
    assert refuse_short_of_pool_space(chunks, qubes.RestoreFlags()) == 150 << 20  # the home check adds it
    pools["ssd"]["usage"] = str(399 << 20)
    with pytest.raises(QtbError, match=r"^pool ssd has 1\.0 MiB free and .* need 150\.0 MiB"):
        refuse_short_of_pool_space(chunks, qubes.RestoreFlags())
    full = {"size": str(400 << 20), "usage": str(399 << 20)}
    for unsaid in ({**full, "driver": "zfs"}, {"driver": "lvm_thin", "size": "0", "usage": "0"}, {}):
        pools["ssd"] = unsaid  # zfs compresses; size 0: lvm.py l.194-210; {}: qvm-pool info failed
        refuse_short_of_pool_space(chunks, qubes.RestoreFlags())  # not refused for it
    pools["vm-pool"]["usage"] = str((1 << 30) - (100 << 20))
    asked.clear()
    refuse_short_of_pool_space(chunks, qubes.RestoreFlags(verify_only=True))  # nothing is made
    assert asked == []
    with pytest.raises(QtbError, match=r"pool vm-pool has 100\.0 MiB free"):
        refuse_short_of_pool_space(chunks, qubes.RestoreFlags())


def test_a_whole_restore_counts_only_what_it_will_restore(monkeypatch):
    """restore --all checks the room for all of it before the first snapshot: not for qubes that
    --skip-conflicting (names taken) or --skip-broken will leave out, as each snapshot's pass does."""

    def copy(qid: int, name: str, template: str | None, mib: int) -> Manifest:
        entry = QubeEntry(f"vm{qid}/", "AppVM" if template else "TemplateVM", template, None)
        chunk = {"path": f"vm{qid}/private.img.000", "size": mib << 20, "tag": "0" * 64}
        return Manifest(BID, "2026-11-24T01:02:03+00:00", "restic", {name: entry}, [chunk], b"")

    manifests = {"s1": copy(1, "debian-12", None, 9), "s2": copy(2, "work", "debian-12", 4)}
    manifests["s3"] = copy(3, "mail", "gone", 100)  # its template is neither here nor restored
    monkeypatch.setattr(restore_action, "latest_copies", lambda *a: (manifests, {}))
    fresh = {
        "dom0": qubes.QubeInfo("AdminVM", 0, True, True),
        "debian-12": qubes.QubeInfo("TemplateVM", 1, False, True),
    }
    monkeypatch.setattr(qubes, "list_qubes", lambda: fresh)  # a fresh system has the template
    counted = []

    def measured(chunks, flags):
        counted.append(sum(c["size"] for c in chunks) >> 20)
        raise QtbError("measured")

    monkeypatch.setattr(restore_action, "refuse_short_of_space", measured)
    flags = qubes.RestoreFlags(skip_conflicting=True, skip_broken=True)
    for given, restored in (
        (flags, 4),
        (replace(flags, skip_conflicting=False, rename_conflicting=True), 13),
    ):
        with pytest.raises(QtbError, match="measured"):
            run_restore_latest(Config(), restore_action.RestoreOptions("", flags=given), [], None)
        assert counted.pop() == restored  # mail (its template gone) never; debian-12 only if not taken


def test_unpacker_refusal_counts_only_the_drivers_own_location():
    """The location is dom0's own command; the backup qube's stderr comes after it on that line, so a
    forged second occurrence changes nothing, and an adapter_command given as a path still matches."""
    loc = "/usr/local/bin/qtb-adapter dump 0123abcd --engine restic"
    line = b"Error extracting data: unable to read the qubes backup file %s (%s): b'%s'"
    assert unpacker_refusal(line % (loc.encode(), b"17", b""), loc) == b"17"
    assert unpacker_refusal(line % (loc.encode(), b"-25", b""), loc) == b"-25"
    forged = b"unable to read the qubes backup file " + loc.encode() + b" (17):"
    assert unpacker_refusal(line % (loc.encode(), b"22", forged), loc) is None
    assert unpacker_refusal(line % (b"qtb-adapter dump other --engine restic", b"17", b""), loc) is None


def test_the_config_file_reads_back_as_written(tmp_path: Path, monkeypatch):
    """Hooks are the user's shell: quotes, backslashes, control characters, any Unicode."""
    monkeypatch.setenv("QTB_PIPE_ROOT", str(tmp_path))
    odd = ["notify-send \"backup failed 🔥\" '\\n'", "printf 'a\\tb\\x7f\\u2028 é' >&2", "tab\there\x7fdel"]
    cfg = Config(include=["work"], exclude=["vault"], hooks={"on_error": odd, "timeout": 5})
    config_path().parent.mkdir(parents=True)
    config_path().write_text(cfg.to_toml())
    assert load_config() == cfg


def test_a_hook_is_waited_for_not_its_children_and_a_hung_one_is_stopped():
    started = time.monotonic()
    assert proc.hook("sleep 5 & exit 0", {}, 10) is None  # a child left running does not hold it
    assert proc.hook("echo oops >&2; exit 4", {}, 5) == "exited with code 4: oops"
    assert proc.hook("exit 4", {"X": "1"}, 5) == "exited with code 4: no message"
    assert proc.hook('test "$X" = 1', {"X": "1"}, 5) is None
    assert time.monotonic() - started < 4
    assert proc.hook("sleep 30", {}, 1) == "still running after 1 s (hooks.timeout): stopped"
    assert time.monotonic() - started < 8


def test_on_error_hears_of_an_interrupt_and_of_a_failed_job(tmp_path: Path, monkeypatch):
    from qtb_pipe.cli import run_hooked

    monkeypatch.setenv("QTB_PIPE_ROOT", str(tmp_path))
    log = tmp_path / "log"
    config_path().parent.mkdir(parents=True)
    hook = f'echo "$QTB_PIPE_COMMAND $QTB_PIPE_EXIT_CODE $QTB_PIPE_ERROR" >> {log}'
    config_path().write_text(Config(hooks={"on_error": [hook]}).to_toml())

    def interrupted(args):
        raise KeyboardInterrupt

    def failed(args):
        raise QtbError("the backup qube said \x00no\x1b[2J", 6)  # its words, made printable for hooks

    for func in (interrupted, failed):
        with pytest.raises((KeyboardInterrupt, QtbError)):
            run_hooked(argparse.Namespace(command="prune", func=func, dry_run=False))
    assert log.read_text().splitlines() == ["prune 130 interrupted", "prune 6 the backup qube said ?no?[2J"]


def test_restore_temp_measure_needs_no_recursion(tmp_path):
    """A hostile tree deeper than Python's recursion limit (os.walk recurses in 3.11) is still
    counted: dom0's bound must not stop at the first deep directory."""
    deep = tmp_path / "t"
    path = str(deep)
    for _ in range(1201):  # not os.makedirs: it recurses too
        os.mkdir(path)
        path += "/d"
    (deep / "f").write_bytes(bytes(10_000))
    try:
        used, entries = qubes.disk_used({deep})
    finally:  # pytest's own clean-up of tmp_path is shutil.rmtree: it recurses as well
        subprocess.run(["rm", "-rf", str(deep)], check=True)
    assert entries == 1201 and used >= 1200 * 4096 + 10_000


def gone(pid: int) -> bool:
    for _ in range(100):  # re-parented to init (or the sandbox's), which reaps it
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists() or b") Z" in stat.read_bytes():
            return True
        time.sleep(0.05)
    return False


def test_kill_tree_kills_the_grandchildren_too():
    parent = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE)
    grandchild = int(parent.stdout.readline())
    assert "300" in proc.tree_args(parent.pid)  # the grandchild's argument: what the guard pins by
    proc.kill_tree(parent.pid)
    assert parent.wait(10) == -9
    assert gone(grandchild), "the grandchild survived"


def test_a_stalled_command_that_ignores_sigint_is_killed_with_all_it_started(monkeypatch, tmp_path):
    """qvm-backup cancels on SIGINT; one that does not, and what it started, are killed after the
    grace (a stuck child would otherwise hold the jobs lock and the backup qube's pipe)."""
    monkeypatch.setattr(proc, "STALL_GRACE_SECONDS", 1)
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(QtbError, match="made no progress for 1 s"):
        proc.run(["sh", "-c", f"trap '' INT; sleep 300 & echo $! > {pid_file}; wait"], stall_seconds=1)
    assert time.monotonic() - started < 10
    assert gone(int(pid_file.read_text())), "the stalled command's child survived"
