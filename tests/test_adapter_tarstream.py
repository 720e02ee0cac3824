"""The adapter's stream filter on real GNU tar streams (no engine involved)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from qtb_adapters.tarstream import StreamFilter, StreamRejected
from streamtools import (
    expected_members,
    make_backup,
    members_by_tar,
    python_tarfile_fails,
    run_filter,
    tar2qfile_like_names,
    write_stream,
)


def written_before_rejection(data: bytes) -> bytes:
    out = bytearray()
    with pytest.raises(StreamRejected):
        StreamFilter(out.extend).run(io.BytesIO(data))
    return bytes(out)


@pytest.fixture(scope="module")
def small_stream(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tarstream")
    backup = make_backup(
        3, volumes={"vm1/private.img": 300_000, "vm2/root.img": 5000}, chunk_bytes=128 * 1024
    )
    return backup, write_stream(backup, tmp / "stream", tmp / "work", mtime=1_700_000_000)


def test_members_and_data_survive_and_headers_are_valid(small_stream, tmp_path: Path) -> None:
    backup, stream = small_stream
    out, summary = run_filter(stream.path.read_bytes())
    assert [m.name for m in summary.members] == [name for name, _ in backup.members()]
    assert [m.size for m in summary.members] == [len(data) for _, data in backup.members()]
    assert summary.stream_bytes == stream.size
    (tmp_path / "out").write_bytes(out)
    assert members_by_tar(tmp_path / "out", tmp_path / "x") == expected_members(backup)
    assert tar2qfile_like_names(tmp_path / "out") == [name for name, _ in backup.members()]


def test_normalised_bytes_do_not_depend_on_the_run_time(small_stream, tmp_path: Path) -> None:
    backup, first = small_stream
    second = write_stream(backup, tmp_path / "again", tmp_path / "work", mtime=1_800_000_123)
    assert first.path.read_bytes() != second.path.read_bytes()  # tar timestamps differ per run
    assert run_filter(first.path.read_bytes())[0] == run_filter(second.path.read_bytes())[0]


def test_without_normalisation_the_stream_is_passed_unchanged(small_stream) -> None:
    _, stream = small_stream
    data = stream.path.read_bytes()
    assert run_filter(data, normalise=False)[0] == data


def test_long_names_keep_their_pax_path(tmp_path: Path) -> None:
    long_volume = "vm7/" + "x" * 120 + ".img"
    backup = make_backup(4, volumes={long_volume: 2000})
    stream = write_stream(backup, tmp_path / "s", tmp_path / "w")
    out, summary = run_filter(stream.path.read_bytes())
    assert f"{long_volume}.000.enc" in [m.name for m in summary.members]
    (tmp_path / "out").write_bytes(out)
    assert members_by_tar(tmp_path / "out", tmp_path / "x") == expected_members(backup)


@pytest.mark.parametrize(
    ("cut", "reason"),
    [
        ("inside_member", "ends inside member"),
        ("member_boundary", "without end-of-archive blocks"),
        ("one_zero_block", "without end-of-archive blocks"),
        ("inside_header", "ends inside"),
    ],
)
def test_cut_streams_are_rejected(small_stream, cut: str, reason: str) -> None:
    _, stream = small_stream
    data = stream.path.read_bytes()
    span = stream.spans[3]
    end = {
        "inside_member": span.member_end - 700,
        "member_boundary": span.member_end,
        "one_zero_block": span.member_end + 512,
        "inside_header": span.start + 300,
    }[cut]
    with pytest.raises(StreamRejected, match=reason):
        run_filter(data[:end])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty stream"),
        (b"hello, this is not a tar stream\n" * 40, "not a ustar"),
        (bytes(10240), "does not start with a tar header"),
    ],
)
def test_garbage_is_rejected(data: bytes, reason: str) -> None:
    with pytest.raises(StreamRejected, match=reason):
        run_filter(data)


def test_corrupted_header_checksum_is_rejected(small_stream) -> None:
    _, stream = small_stream
    data = bytearray(stream.path.read_bytes())
    data[stream.spans[2].start + 10] ^= 0x01
    with pytest.raises(StreamRejected, match="checksum"):
        run_filter(bytes(data))


def test_an_engine_that_sees_eof_early_always_sees_a_cut_member(small_stream) -> None:
    """What was forwarded before the end is never a clean tar end (borg import-tar then fails)."""
    _, stream = small_stream
    data = stream.path.read_bytes()
    cuts = {stream.spans[-1].member_end, stream.spans[-1].member_end - 100, stream.spans[4].member_end + 512}
    cuts |= {span.start + 1536 for span in stream.spans[1:4]}
    for end in sorted(cuts):
        forwarded = written_before_rejection(data[:end])
        assert python_tarfile_fails(forwarded), f"cut at {end} forwarded a clean-looking stream"


def test_a_complete_stream_parses_cleanly_after_the_filter(small_stream) -> None:
    _, stream = small_stream
    assert not python_tarfile_fails(run_filter(stream.path.read_bytes())[0])
