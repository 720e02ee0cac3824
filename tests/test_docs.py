"""Lists that exist twice, pinned: the exit codes in the docs and in the code, the command reference
and the parser it is generated from, the JSON reference and its schemas."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from qtb_adapters.errors import ExitCode

from qtb_pipe import errors
from qtb_pipe.adapter import ADAPTER_EXIT
from qtb_pipe.cli import EPILOG

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gen_commands_doc  # noqa: E402
import gen_json_doc  # noqa: E402


def test_commands_doc_is_what_the_parser_says():
    assert (ROOT / "docs/commands.md").read_text() == gen_commands_doc.render(), (
        "docs/commands.md is stale: run .venv/bin/python scripts/gen_commands_doc.py"
    )


def test_json_doc_is_what_the_schemas_say():
    assert (ROOT / "docs/json.md").read_text() == gen_json_doc.render(), (
        "docs/json.md is stale: run .venv/bin/python scripts/gen_json_doc.py"
    )


def test_qtb_pipe_exit_codes_in_help_match_the_code():
    codes = sorted(v for k, v in vars(errors).items() if k.startswith("EXIT_"))
    listed = [int(n) for n in re.findall(r"(?:codes: |, )([0-9]+) ", EPILOG.replace("\n", " "))]
    assert listed == codes and codes[:-1] == list(range(len(codes) - 1)) and codes[-1] == 130


def test_adapter_exit_table_matches_the_code():
    text = (ROOT / "docs/adapters.md").read_text()
    rows = re.findall(r"^\| ([0-9]+|128\+n) \| ", text, flags=re.M)
    assert rows == [str(int(c)) for c in ExitCode] + ["128+n"]


def test_dom0_knows_every_adapter_failure_code():
    failures = {int(c) for c in ExitCode} - {ExitCode.OK, ExitCode.OTHER, ExitCode.USAGE, ExitCode.BAD_INPUT}
    # usage and bad input are dom0's own mistakes or a hostile stream: the adapter's line is shown as is
    assert failures <= set(ADAPTER_EXIT), failures - set(ADAPTER_EXIT)


def test_troubleshooting_rows_quote_messages_the_code_still_says():
    """A row whose message was reworded in the code would send users looking for nothing."""
    source = "".join(
        p.read_text() for d in ("qtb_pipe", "adapters", "scrypt_shim") for p in (ROOT / d).rglob("*.py")
    )
    stock = ("retrieved backup size exceed expected size", "-> Done.")  # Qubes' own words
    rows = [
        ln
        for ln in (ROOT / "docs/troubleshooting.md").read_text().splitlines()
        if ln.startswith("| ") and "---" not in ln
    ][1:]
    assert len(rows) >= 20
    for row in rows:
        first = row.split(" | ")[0]
        for quoted in (q for q in re.findall(r"`([^`]+)`", first) if q not in stock):
            for part in re.split(r"…|QUBE|FILE|ENGINE|\bN\b|\bID\b", quoted):
                part = part.strip(" ,:/.")
                if len(part) >= 5:
                    assert part in source, (part, row)


def test_the_readme_states_the_versions_the_code_supports():
    """12.1: what the README says it is written for is what the code refuses outside of (the
    adapter's engine bounds, pyproject's Python) and what `make test` runs (the setup's engines)."""
    from qtb_adapters.borg import BorgEngine
    from qtb_adapters.restic import ResticEngine
    from test_adapter_engines import VERSIONED_BINARIES

    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"\*\*What it is written for\.\*\*(.+?)\n\n", readme, re.S)[1].replace("\n", " ")

    def dotted(version: tuple[int, ...]) -> str:
        return ".".join(map(str, version)).removesuffix(".0")

    assert f"restic >= {dotted(ResticEngine.minimum_version)} " in stated
    assert (
        f"borg {dotted(BorgEngine.minimum_version)} up to, not including, {BorgEngine.below_version[0]} "
        in stated
    )
    python = re.search(r'requires-python = ">=([0-9.]+)"', (ROOT / "pyproject.toml").read_text())[1]
    assert f"Python >= {python} " in stated
    tested = dict(re.findall(r"(restic|borg) ([0-9.]+ and [0-9.]+)", stated))  # oldest and newest run
    for _, binary, version in VERSIONED_BINARIES.values():  # restic-0.14, borg-1.4 (make setup)
        assert version.rstrip(".") in tested[binary.split("-")[0]].split(" and "), (binary, tested)
