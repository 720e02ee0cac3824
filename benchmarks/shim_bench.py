"""Throughput of the scrypt shim vs the real scrypt vs `cat` on one 100 MiB chunk (not a test).

    .venv/bin/python benchmarks/shim_bench.py [--size-mib 100] [--no-real] [--work DIR]

enc is measured the way qubesd runs it (`scrypt enc - OUT`, data on a pipe), dec the way
qvm-backup-restore does (`scrypt dec -f IN OUT`, with the run's plan in place, so every check runs).
Without a terminal (a new session), both read the passphrase as lines on stdin (`-P` for dec)
instead of from a pty: the dialogue costs microseconds and is tested elsewhere. The real scrypt
runs with its default work factor, once. Page cache is warm (the input was just written); nothing
here needs root. The plan stress (`run_plan_stress`) times the last chunk of a 10,000-chunk restore
against its first: the shim's work per chunk must not grow with the plan.

`run_shim_benchmark()` returns the figures for the project benchmark suite.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from qtb_pipe import runs, shim_install
from scrypt_shim import shim

MiB = 1024 * 1024
REAL_SCRYPT = Path("/usr/bin/scrypt")
BACKUP_ID = "20261124T003908-3222"
CHUNK_PATH = "vm12/private.img.000"


@dataclass
class BenchResult:
    operation: str  # "enc" or "dec"
    tool: str  # "shim", "real scrypt", "cat"
    size_bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.size_bytes / 1e6 / self.seconds


def _timed(command: list[str], *, stdin_file: Path | None, passphrase_lines: int, passphrase: str) -> float:
    """Wall time of `command` in a new session (no tty): stdin gets the passphrase lines, then
    the content of `stdin_file` through a pipe, as qubesd's chunk pipe would."""
    feed = "; ".join(
        ["printf '%s\\n' \"$QTB_BENCH_PW\""] * passphrase_lines
        + ([f"cat '{stdin_file}'"] if stdin_file else [])
    )
    start = time.perf_counter()
    feeder = subprocess.Popen(
        ["sh", "-c", feed], stdout=subprocess.PIPE, env={**os.environ, "QTB_BENCH_PW": passphrase}
    )
    consumer = subprocess.run(
        command, stdin=feeder.stdout, capture_output=True, check=False, start_new_session=True
    )
    feeder.stdout.close()
    feeder.wait()
    elapsed = time.perf_counter() - start
    if consumer.returncode != 0:
        raise RuntimeError(
            f"{command} failed ({consumer.returncode}): {consumer.stderr.decode(errors='replace')}"
        )
    return elapsed


def _make_input(path: Path, size: int) -> None:
    # Incompressible-looking but cheap: random 1 MiB blocks, each reused a few times.
    blocks = [os.urandom(MiB) for _ in range(8)]
    with path.open("wb") as out:
        for index in range(size // MiB):
            out.write(blocks[index % len(blocks)])
        out.write(os.urandom(size % MiB))
        out.flush()
        os.fsync(out.fileno())  # its writeback must not land in the middle of the timed runs


def _shim_root(base: Path) -> tuple[Path, Path]:
    """A throwaway dom0 root with the shim installed: (shim, state directory)."""
    root = base / "dom0"
    for folder in ("usr/bin", "usr/local/bin"):
        (root / folder).mkdir(parents=True)
    (root / "usr/bin/scrypt").symlink_to(REAL_SCRYPT)
    return Path(shim_install.install_shim(root)["shim"]), root.resolve() / "var/lib/qtb-pipe"


def run_shim_benchmark(
    size: int = 100 * MiB, include_real: bool = True, work: Path | None = None
) -> list[BenchResult]:
    """Install the shim into a throwaway dom0 root and time enc/dec for shim, real scrypt and cat."""
    with tempfile.TemporaryDirectory(prefix="shim-bench-", dir=work) as temp:
        base = Path(temp)
        shim_path, state_dir = _shim_root(base)
        secret, token = secrets.token_bytes(32), secrets.token_hex(16)
        run_dir = state_dir / "runs" / token
        run_dir.mkdir(parents=True, mode=0o700)
        qtb = f"{BACKUP_ID}!{CHUNK_PATH}!{runs.make_user_passphrase(token, secret)}"
        chunk = base / "chunk"
        _make_input(chunk, size)
        results: list[BenchResult] = []
        shim_enc = base / "shim.enc"
        # >tmpfs: the same into memory, the shim's own copy/HMAC loop without the disk
        memory = (
            Path(tempfile.mkdtemp(prefix="shim-bench-", dir="/dev/shm"))
            if Path("/dev/shm").is_dir()
            else None
        )
        for tool, out in (("shim", shim_enc), *((("shim>tmpfs", memory / "out"),) if memory else ())):
            seconds = _timed(
                [str(shim_path), "enc", "-", str(out)], stdin_file=chunk, passphrase_lines=2, passphrase=qtb
            )
            results.append(BenchResult("enc", tool, size, seconds))
        if memory:
            shutil.rmtree(memory)
        # the driver's part between backup and restore: a new run with the pass's plan
        record = json.loads((run_dir / "records.jsonl").read_bytes().splitlines()[0])
        (run_dir / "records.jsonl").unlink()
        (run_dir / "plan").write_bytes(
            runs.plan_line("qtb-plan", BACKUP_ID) + runs.plan_line(CHUNK_PATH, record["size"], record["tag"])
        )
        dec = [str(shim_path), "dec", "-f", "-P", str(shim_enc), str(base / "shim.out")]
        results.append(
            BenchResult("dec", "shim", size, _timed(dec, stdin_file=None, passphrase_lines=1, passphrase=qtb))
        )
        if include_real:
            real_enc = base / "real.enc"
            seconds = _timed(
                [str(REAL_SCRYPT), "enc", "-", str(real_enc)],
                stdin_file=chunk,
                passphrase_lines=2,
                passphrase="bench",
            )
            results.append(BenchResult("enc", "real scrypt", size, seconds))
            dec = [str(REAL_SCRYPT), "dec", "-f", "-P", str(real_enc), str(base / "real.out")]
            results.append(
                BenchResult(
                    "dec",
                    "real scrypt",
                    size,
                    _timed(dec, stdin_file=None, passphrase_lines=1, passphrase="bench"),
                )
            )
        cat_out = base / "cat.out"
        seconds = _timed(
            ["sh", "-c", f"cat > '{cat_out}'"], stdin_file=chunk, passphrase_lines=0, passphrase=""
        )
        results.append(BenchResult("enc", "cat", size, seconds))
        seconds = _timed(
            ["sh", "-c", f"cat '{chunk}' > '{cat_out}'"], stdin_file=None, passphrase_lines=0, passphrase=""
        )
        results.append(BenchResult("dec", "cat", size, seconds))
        return results


def chunk_tag(chunk_key: bytes, path: str, data: bytes) -> bytes:
    hasher = shim.TagHasher(chunk_key, path)
    hasher.update(data)
    return hasher.finish()


def run_plan_stress(chunks: int = 10_000, work: Path | None = None) -> dict[str, float]:
    """Seconds for the shim's dec of the first and of the last chunk of a `chunks`-chunk plan."""
    with tempfile.TemporaryDirectory(prefix="shim-plan-", dir=work) as temp:
        base = Path(temp)
        shim_path, state_dir = _shim_root(base)
        secret, token = secrets.token_bytes(32), secrets.token_hex(16)
        run_dir = state_dir / "runs" / token
        run_dir.mkdir(parents=True, mode=0o700)
        keys = shim.derive_keys(secret)
        paths = [f"vm{1 + i // 1000}/private.img.{i % 1000:03d}" for i in range(chunks)]
        data = b"x" * 4096
        lines = [runs.plan_line("qtb-plan", BACKUP_ID)]
        lines += [runs.plan_line(p, len(data), chunk_tag(keys.chunk_key, p, data).hex()) for p in paths]
        (run_dir / "plan").write_bytes(b"".join(lines))
        timings = {}
        for label, index in (("first chunk", 0), ("last chunk", chunks - 1)):
            source = base / "in.enc"
            tag = chunk_tag(keys.chunk_key, paths[index], data)
            source.write_bytes(data + shim.make_trailer(keys, len(data), tag))
            qtb = f"{BACKUP_ID}!{paths[index]}!{runs.make_user_passphrase(token, secret)}"
            dec = [str(shim_path), "dec", "-f", "-P", str(source), str(base / "out")]
            runs_seconds = []
            for _ in range(5):
                (run_dir / "accepted").write_bytes(b"+" * index)  # as if every chunk before it was accepted
                runs_seconds.append(_timed(dec, stdin_file=None, passphrase_lines=1, passphrase=qtb))
            timings[label] = min(runs_seconds)
        return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument(
        "--no-real", action="store_true", help="skip the real scrypt (about 10 s and ~1 GB RAM)"
    )
    parser.add_argument("--work", type=Path, default=None, help="directory for the temporary files")
    args = parser.parse_args(argv)
    results = run_shim_benchmark(args.size_mib * MiB, include_real=not args.no_real, work=args.work)
    print(f"{'op':4} {'tool':12} {'seconds':>8} {'MB/s':>9}")
    for result in results:
        print(f"{result.operation:4} {result.tool:12} {result.seconds:8.3f} {result.mb_per_s:9.1f}")
    for label, seconds in run_plan_stress(work=args.work).items():
        print(f"dec of the {label} of a 10,000-chunk restore: {seconds * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
