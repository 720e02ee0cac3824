"""borg import-tar with split members: large members go in as head/body/tail pieces and come back whole.

The filter and the join on their own (no engine), then through real borg: round trip, archives made
without splitting, and the point of it all: a re-run whose large members differ only in a few bytes
near their start and in their last 32 bytes (as LVM-thin volume chunks do every run) stores far less
than one chunk per member, where unsplit members each store their first and last chunk again.
"""

from __future__ import annotations

import io
import json
import secrets
import subprocess
from pathlib import Path

import pytest
from conftest_remote import ENGINE_PASSWORD, AdapterHome, directory_bytes
from qtb_adapters.tarjoin import JoinError, Rejoin
from qtb_adapters.tarstream import (
    SPLIT_HEAD_BYTES,
    SPLIT_MIN_BYTES,
    SPLIT_TAIL_BYTES,
    StreamFilter,
    StreamRejected,
    piece_header,
    split_names,
)
from streamtools import (
    V4Backup,
    expected_members,
    make_backup,
    members_by_tar,
    python_tarfile_fails,
    run_filter,
    tar2qfile_like_names,
    write_stream,
)

MIB = 1024 * 1024
LONG_VOLUME = "vm3/" + "x" * 80 + ".img"  # member name of 96 bytes: its pieces' names would not fit
# Inner data sizes; each member also carries the 56-byte trailer. Around the threshold on both sides.
VOLUMES = {
    "vm1/private.img": 700_000,
    "vm2/root.img": SPLIT_MIN_BYTES - SPLIT_TAIL_BYTES,  # exactly the threshold
    "vm4/root.img": SPLIT_MIN_BYTES - SPLIT_TAIL_BYTES - 1,  # one byte below
    LONG_VOLUME: 200_000,
}


@pytest.fixture(scope="module")
def split_stream(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("split")
    backup = make_backup(5, volumes=VOLUMES, chunk_bytes=256 * 1024)
    return backup, write_stream(backup, tmp / "stream", tmp / "work")


def joined(data: bytes) -> bytes:
    out = bytearray()
    Rejoin(out.extend).run(io.BytesIO(data))
    return bytes(out)


def tar_names(data: bytes) -> list[tuple[str, int]]:
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data), mode="r|", ignore_zeros=True) as archive:
        return [(info.name, info.size) for info in archive]


def large(backup: V4Backup) -> list[str]:
    return [n for n, d in backup.members() if len(d) >= SPLIT_MIN_BYTES and len(n) + 9 <= 100]


# -- the filter and the join, no engine ---------------------------------------------------------
def test_large_members_go_out_as_three_pieces_and_join_back(split_stream, tmp_path: Path) -> None:
    backup, stream = split_stream
    out, summary = run_filter(stream.path.read_bytes(), split=True)
    members = backup.members()
    assert [(m.name, m.size) for m in summary.members] == [(n, len(d)) for n, d in members]  # original
    expected = []
    for name, data in members:
        if name in large(backup):
            head, body, tail = (n.decode() for n in split_names(name.encode()))
            expected += [(head, SPLIT_HEAD_BYTES), (body, len(data) - SPLIT_HEAD_BYTES - 56), (tail, 56)]
        else:
            expected.append((name, len(data)))
    assert tar_names(out) == expected
    assert f"{LONG_VOLUME}.000.enc" in dict(expected)  # too long a name: not split
    assert "vm2/root.img.000.enc.qtb-head" in dict(expected)
    assert "vm4/root.img.000.enc" in dict(expected)
    (tmp_path / "joined").write_bytes(joined(out))
    assert members_by_tar(tmp_path / "joined", tmp_path / "x") == expected_members(backup)
    assert tar2qfile_like_names(tmp_path / "joined") == [name for name, _ in members]
    # Without splitting the join changes nothing.
    plain, _ = run_filter(stream.path.read_bytes())
    assert joined(plain) == plain


def test_an_engine_that_sees_eof_early_sees_a_cut_member_inside_split_members(split_stream) -> None:
    _, stream = split_stream
    data = stream.path.read_bytes()
    span = next(s for s in stream.spans if s.name == "vm1/private.img.001.enc")
    size = 256 * 1024 + 56
    data_start = span.member_end - (size + 511) // 512 * 512
    offsets = [0, 100, SPLIT_HEAD_BYTES - 1, SPLIT_HEAD_BYTES, SPLIT_HEAD_BYTES + 1, size // 2]
    offsets += [size - 56 - 1, size - 56, size - 56 + 1, size - 1, size]
    for offset in offsets:
        forwarded = bytearray()
        with pytest.raises(StreamRejected):
            StreamFilter(forwarded.extend, split=True).run(io.BytesIO(data[: data_start + offset]))
        assert python_tarfile_fails(bytes(forwarded)), f"cut at data offset {offset}: clean-looking end"
    for end in (span.member_end, span.member_end + 512, span.end):  # complete member, no stream end
        forwarded = bytearray()
        with pytest.raises(StreamRejected):
            StreamFilter(forwarded.extend, split=True).run(io.BytesIO(data[:end] + b"\1" * 512))
        assert python_tarfile_fails(bytes(forwarded))


def test_reserved_names_are_refused_while_splitting(tmp_path: Path) -> None:
    class WithReservedName(V4Backup):
        def members(self) -> list[tuple[str, bytes]]:
            return [*super().members(), ("vm1/private.img.000.enc.qtb-body", b"x")]

    plain = make_backup(6, volumes={"vm1/private.img": 2000})
    backup = WithReservedName(plain.backup_id, plain.qubes, plain.chunks)
    stream = write_stream(backup, tmp_path / "s", tmp_path / "w")
    with pytest.raises(StreamRejected, match="reserved"):
        run_filter(stream.path.read_bytes(), split=True)
    run_filter(stream.path.read_bytes())  # not splitting: just a name


def _member(name: bytes, data: bytes, template: bytes) -> bytes:
    return piece_header(template, name, len(data)) + data + bytes(-len(data) % 512)


@pytest.mark.parametrize(
    ("pieces", "reason"),
    [
        ([("h", 4096)], "cut short|ends inside"),
        ([("b", 70_000), ("t", 56)], "out of order"),
        ([("h", 4096), ("t", 56)], "out of order"),
        ([("h", 4096), ("b", 70_000)], "cut short|ends inside"),
        ([("h", 4096), ("b", 70_000), ("t", 57)], "not 56"),
        ([("h", 4096), ("plain", 10)], "lacks its body"),
        ([("h", 4096), ("b", 70_000), ("h", 4096)], "lacks its tail"),
        ([("h", 4096), ("B", 70_000), ("t", 56)], "out of order"),
        ([("h", 200_000)], "too large for a head"),
    ],
)
def test_the_join_refuses_anything_but_exact_triples(split_stream, pieces, reason) -> None:
    _, stream = split_stream
    template = run_filter(stream.path.read_bytes(), split=True)[0][
        :512
    ]  # a plain ustar header, as we make them
    assert template[156:157] == b"0"
    head, body, tail = split_names(b"vm1/private.img.000.enc")
    names = {"h": head, "b": body, "t": tail, "B": b"vm9/private.img.000.enc.qtb-body", "plain": b"other"}
    data = b"".join(_member(names[kind], bytes(size), template) for kind, size in pieces) + bytes(1024)
    with pytest.raises(JoinError, match=reason):
        joined(data)
    with pytest.raises(JoinError, match="ends inside"):
        joined(_member(b"plain", bytes(5000), template)[:3000])


# -- real borg ----------------------------------------------------------------------------------
def borg_items(home: AdapterHome, repo: Path, archive: str) -> list[tuple[str, int]]:
    env = {**home.env, "BORG_PASSPHRASE": ENGINE_PASSWORD}
    done = subprocess.run(
        ["borg", "list", "--json-lines", f"{repo}::{archive}"], env=env, capture_output=True, check=True
    )
    items = [json.loads(line) for line in done.stdout.splitlines()]
    return [(item["path"], item["size"]) for item in items if item["type"] == "-"]


def store_commit(home: AdapterHome, backup: V4Backup, stream_path: Path) -> dict:
    run = "run" + secrets.token_hex(6)
    stored = home.ok("store", "--run", run, "--json", stdin=stream_path).json()
    pending = home.ok("pending", "--run", run, "--json").json()
    assert [(m["name"], m["size"]) for m in pending["members"]] == [(n, len(d)) for n, d in backup.members()]
    home.ok("commit", "--run", run, stdin=backup.manifest("borg"))
    return stored


def test_borg_round_trip_of_split_and_unsplit_archives(split_stream, tmp_path: Path) -> None:
    backup, stream = split_stream
    home = AdapterHome(tmp_path / "qube")
    repo = tmp_path / "repo"
    home.init("borg", str(repo), "split_members=false")  # first an archive as before splitting
    old = store_commit(home, backup, stream.path)
    assert old["method"] == "import-tar"
    home.edit_config("split_members = false", "split_members = true")
    new = store_commit(home, backup, stream.path)
    assert new["method"] == "import-tar-split"
    names = [name for name, _ in borg_items(home, repo, new["id"])]
    assert "vm1/private.img.000.enc.qtb-tail" in names
    assert "vm1/private.img.000.enc" not in names
    assert [name for name, _ in borg_items(home, repo, old["id"])] == [n for n, _ in backup.members()]
    for snapshot in (old, new):
        dumped = tmp_path / f"dumped-{snapshot['method']}"
        home.ok_to_file(dumped, "dump", snapshot["id"])
        assert members_by_tar(dumped, tmp_path / "extract") == expected_members(backup)
        assert tar2qfile_like_names(dumped) == [name for name, _ in backup.members()]
        home.dump_read_partly(snapshot["id"], 300_000)  # into a split member: the join's early end
    assert {s["id"] for s in home.snapshots()} == {old["id"], new["id"]}
    # docs/emergency-restore.md's join, as written there: borg export-tar, no qtb-adapter
    env = {**home.env, "BORG_PASSPHRASE": ENGINE_PASSWORD}
    exported = subprocess.run(
        ["borg", "export-tar", f"{repo}::{new['id']}", "-"], env=env, capture_output=True, check=True
    ).stdout
    rescued = tmp_path / "rescued"
    rescued.write_bytes(subprocess.run(["python3", "-c", emergency_join_script()], input=exported,
                                       capture_output=True, check=True).stdout)  # fmt: skip
    assert members_by_tar(rescued, tmp_path / "rescue") == expected_members(backup)
    assert tar2qfile_like_names(rescued) == [name for name, _ in backup.members()]


def emergency_join_script() -> str:
    """The Python that docs/emergency-restore.md pipes `borg export-tar` of a split archive into."""
    text = (Path(__file__).parent.parent / "docs/emergency-restore.md").read_text()
    opening = "borg export-tar REPO::qtb-s-… - | python3 -c '\n"
    start = text.index(opening) + len(opening)
    return text[start : text.index("\n' > qubes-backup.stream", start)]


def _perturbed(backup: V4Backup, run: int) -> V4Backup:
    """The same backup, as the next run of an LVM-thin volume gives it: in every chunk a few bytes
    near its start differ (the inner tar's GNUSparseFile.<pid> name); so does its tag, at its end."""
    chunks = []
    for path, data in backup.chunks:
        if len(data) > 2048:
            data = data[:1042] + f"GNUSparseFile.{run:04d}".encode() + data[1060:]
        chunks.append((path, data))
    return V4Backup(backup.backup_id, backup.qubes, chunks)


def test_a_rerun_with_per_run_bytes_at_both_ends_of_members_stores_little(tmp_path: Path) -> None:
    first = make_backup(
        41, volumes={"vm1/private.img": 12 * MIB, "vm2/root.img": 8 * MIB}, chunk_bytes=4 * MIB
    )
    first = _perturbed(first, 1)
    second = _perturbed(first, 2)
    streams = [
        write_stream(b, tmp_path / f"stream{i}", tmp_path / "work", mtime=1_700_000_000 + i * 86_400)
        for i, b in enumerate((first, second))
    ]
    members = len(large(first))
    assert members == 5
    for (name, one), (_, two) in zip(first.members(), second.members(), strict=True):
        if name in large(first):  # the same but for bytes 1042-1059 and the tag
            assert one[:1042] + one[1060:-32] == two[:1042] + two[1060:-32] and one != two
            assert one[1042:1060] != two[1042:1060] and one[-32:] != two[-32:]
    growth = {}
    for split in (True, False):
        home = AdapterHome(tmp_path / f"qube-{split}")
        repo = tmp_path / f"repo-{split}"
        home.init("borg", str(repo), f"split_members={'true' if split else 'false'}")
        sizes = []
        for stream in streams:
            home.ok("store", "--run", "run" + secrets.token_hex(6), stdin=stream.path)
            sizes.append(directory_bytes(repo))
        growth[split] = sizes[1] - sizes[0]
    size = streams[0].size
    percent = {split: f"{100 * grown / size:.3f}%" for split, grown in growth.items()}
    print(f"\nstream {size} B, {members} large members; re-run growth: split +{growth[True]} B "
          f"({percent[True]}), unsplit +{growth[False]} B ({percent[False]})")  # fmt: skip
    # Unsplit, each member stores its first and last ~1 MiB chunk again; split, a few kB each.
    assert growth[False] > members * 512 * 1024
    assert growth[True] < members * 64 * 1024
    assert growth[True] < 0.05 * growth[False]


def test_a_split_archive_that_does_not_join_back_fails_its_dump(tmp_path: Path) -> None:
    """A lone head piece in an archive marked split (made here by hand: unsplit store of such a
    name, then the marker put in with borg recreate): dump fails with exit 1, not a quiet cut."""

    class WithLoneHead(V4Backup):
        def members(self) -> list[tuple[str, bytes]]:
            members = super().members()
            return [*members[:3], ("vm1/private.img.000.enc.qtb-head", bytes(4096)), *members[3:]]

    plain = make_backup(8, volumes={"vm1/private.img": 200_000})
    backup = WithLoneHead(plain.backup_id, plain.qubes, plain.chunks)
    stream = write_stream(backup, tmp_path / "s", tmp_path / "w")
    home = AdapterHome(tmp_path / "qube")
    repo = tmp_path / "repo"
    home.init("borg", str(repo), "split_members=false")
    stored = store_commit(home, backup, stream.path)
    env = {**home.env, "BORG_PASSPHRASE": ENGINE_PASSWORD}
    comment = json.dumps({"method": "import-tar-split", "qtb": "stream", "run": stored["run"]})
    subprocess.run(
        ["borg", "recreate", "--comment", comment.replace("{", "{{").replace("}", "}}"),
         f"{repo}::{stored['id']}"], env=env, capture_output=True, check=True,
    )  # fmt: skip
    (home.home / ".local/state/qtb-pipe/complete/borg.json").unlink()  # it cached the old method
    assert home.ok("list", "--json").json()["snapshots"][0]["id"] == stored["id"]
    failed = home.run("dump", stored["id"])
    assert failed.returncode == 1, failed.stderr
    [line] = failed.stderr.strip().splitlines()
    assert "does not join back" in line and "lacks its body" in line


@pytest.mark.parametrize("cut", ["at a member boundary", "inside a member", "before any output"])
def test_a_borg_that_fails_midway_through_a_split_dump_is_an_error(split_stream, tmp_path, cut) -> None:
    """ssh losing the connection makes borg fail with "Broken pipe" in its text while our own reader
    is still there: that is borg's error (exit 1, its words), never the quiet end of a dump whose
    reader went away, and never a stream cut between members passed off as whole."""
    backup, stream = split_stream
    partial, wrapper = tmp_path / "partial", tmp_path / "borg-cut"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'case "$2" in export-tar) [ -e {partial} ] && {{ cat {partial}; '
        'echo "packet_write_wait: Connection to backup port 22: Broken pipe" >&2; exit 2; }; esac\n'
        'exec borg "$@"\n'
    )
    wrapper.chmod(0o755)
    home = AdapterHome(tmp_path / "qube")
    repo = tmp_path / "repo"
    home.init("borg", str(repo), f"binary={wrapper}")
    stored = store_commit(home, backup, stream.path)
    exported = tmp_path / "whole"
    home.ok_to_file(exported, "dump", stored["id"])  # the whole stream, through the wrapper
    whole = exported.read_bytes()
    boundary = 512 + (tar_items(whole)[0]["size"] + 511) // 512 * 512  # after the first member
    keep = {"at a member boundary": boundary, "inside a member": boundary + 700, "before any output": 0}[cut]
    partial.write_bytes(whole[:keep])
    failed = home.run("dump", stored["id"])
    assert failed.returncode == 1, (failed.returncode, failed.stderr)
    [line] = failed.stderr.strip().splitlines()
    assert "borg dump failed" in line and "Broken pipe" in line


def tar_items(data: bytes) -> list[dict]:
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as archive:
        return [{"name": i.name, "size": i.size} for i in archive]


def test_stream_archive_comments_read_as_borg_leaves_them() -> None:
    """borg create expands the doubled braces of --comment, borg 1.2/1.4 import-tar keeps them: the
    method (import-tar-split) must be read from both, or a split archive would be dumped unjoined."""
    from qtb_adapters.borg import _comment, _parse_comment

    data = {"method": "import-tar-split", "qtb": "stream", "run": "r1"}
    assert _parse_comment(_comment(data)) == data  # as import-tar keeps it
    assert _parse_comment(_comment(data).replace("{{", "{").replace("}}", "}")) == data  # as create
    assert _parse_comment("") == {} and _parse_comment("not json") == {} and _parse_comment("[1]") == {}
