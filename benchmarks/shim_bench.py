"""Throughput of the scrypt shim vs the real scrypt vs `cat` on one 100 MiB chunk (not a test).

    .venv/bin/python benchmarks/shim_bench.py [--size-mib 100] [--no-real] [--work DIR]

enc is measured the way qubesd runs it (`cat CHUNK | scrypt enc - OUT`, data on a pipe), dec the way
qvm-backup-restore does (`scrypt dec -f IN OUT`, with the run's sealed manifest in place, so every
check runs). The passphrase comes from `--passphrase env:…` instead of a pty: the dialogue costs
microseconds and is tested elsewhere. The real scrypt runs with its default work factor, once.
Page cache is warm (the input was just written); nothing here needs root.

`run_shim_benchmark()` returns the figures for the project benchmark suite.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from qtb_pipe import shim_install
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


def _timed(
    command: list[str], *, stdin_file: Path | None, env: dict[str, str] | None, pipe_from_cat: bool
) -> float:
    """Wall time of `command`, optionally fed by `cat stdin_file |` as qubesd's pipe would be."""
    start = time.perf_counter()
    if pipe_from_cat:
        assert stdin_file is not None
        feeder = subprocess.Popen(["cat", str(stdin_file)], stdout=subprocess.PIPE)
        assert feeder.stdout is not None
        consumer = subprocess.run(command, stdin=feeder.stdout, env=env, capture_output=True, check=False)
        feeder.stdout.close()
        feeder.wait()
    else:
        consumer = subprocess.run(
            command, stdin=subprocess.DEVNULL, env=env, capture_output=True, check=False
        )
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


def run_shim_benchmark(
    size: int = 100 * MiB, include_real: bool = True, work: Path | None = None
) -> list[BenchResult]:
    """Install the shim into a throwaway dom0 root and time enc/dec for shim, real scrypt and cat."""
    with tempfile.TemporaryDirectory(prefix="shim-bench-", dir=work) as temp:
        base = Path(temp)
        root = base / "dom0"
        (root / "usr/bin").mkdir(parents=True)
        (root / "usr/bin/scrypt").symlink_to(REAL_SCRYPT)
        installed = shim_install.install_shim(root)
        secret, token = secrets.token_bytes(32), secrets.token_hex(16)
        run_dir = installed.state_dir / "runs" / token
        run_dir.mkdir(parents=True)
        user_passphrase = shim.make_user_passphrase(token, secret)
        env = {**os.environ, "QTB_BENCH_PASSPHRASE": f"{BACKUP_ID}!{CHUNK_PATH}!{user_passphrase}"}
        real_env = {**os.environ, "QTB_BENCH_PASSPHRASE": "benchmark passphrase"}
        by_env = ["--passphrase", "env:QTB_BENCH_PASSPHRASE"]

        chunk = base / "chunk"
        _make_input(chunk, size)
        results: list[BenchResult] = []

        shim_enc = base / "shim.enc"
        seconds = _timed(
            [str(installed.shim_path), "enc", *by_env, "-", str(shim_enc)],
            stdin_file=chunk,
            env=env,
            pipe_from_cat=True,
        )
        results.append(BenchResult("enc", "shim", size, seconds))
        seconds = _timed(  # the same without the disk: the shim's own copy/HMAC loop
            [str(installed.shim_path), "enc", *by_env, "-", os.devnull],
            stdin_file=chunk,
            env=env,
            pipe_from_cat=True,
        )
        results.append(BenchResult("enc", "shim>null", size, seconds))
        # the driver's part between backup and restore: manifest from the record, in a new run dir
        record = shim.read_records(str(run_dir))[0]
        body = {
            "format": shim.MANIFEST_FORMAT,
            "backup_id": BACKUP_ID,
            "created": "2026-11-24T00:39:08Z",
            "engine": "restic",
            "qubes": ["work"],
            "chunks": [{"path": CHUNK_PATH, "size": record["size"], "tag": record["tag"]}],
        }
        (run_dir / "manifest.json").write_bytes(shim.seal_manifest(secret, body))
        (run_dir / "records.jsonl").unlink()
        seconds = _timed(
            [str(installed.shim_path), "dec", "-f", *by_env, str(shim_enc), str(base / "shim.out")],
            stdin_file=None,
            env=env,
            pipe_from_cat=False,
        )
        results.append(BenchResult("dec", "shim", size, seconds))

        if include_real:
            real_enc = base / "real.enc"
            seconds = _timed(
                [str(REAL_SCRYPT), "enc", *by_env, "-", str(real_enc)],
                stdin_file=chunk,
                env=real_env,
                pipe_from_cat=True,
            )
            results.append(BenchResult("enc", "real scrypt", size, seconds))
            seconds = _timed(
                [str(REAL_SCRYPT), "dec", "-f", *by_env, str(real_enc), str(base / "real.out")],
                stdin_file=None,
                env=real_env,
                pipe_from_cat=False,
            )
            results.append(BenchResult("dec", "real scrypt", size, seconds))

        cat_out = base / "cat.out"
        # cat with the fsync the shim does, so the disk cost is the same on both sides
        seconds = _timed(
            ["sh", "-c", f"cat > '{cat_out}' && sync '{cat_out}'"],
            stdin_file=chunk,
            env=None,
            pipe_from_cat=True,
        )
        results.append(BenchResult("enc", "cat", size, seconds))
        seconds = _timed(
            ["sh", "-c", f"cat '{chunk}' > '{cat_out}'"], stdin_file=None, env=None, pipe_from_cat=False
        )
        results.append(BenchResult("dec", "cat", size, seconds))
        return results


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
