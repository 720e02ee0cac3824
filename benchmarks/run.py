"""`make bench`: qtb-pipe against stock qvm-backup and against the engines fed directly.

    python -m benchmarks.run [--size 1G] [--smoke] [--out DIR]

One workload (qubes-sim, deterministic seed), three states: the initial world, ~2% of blocks
rewritten plus inserted/appended data and new dom0 files, and the same again unchanged. For each
state, interleaved so machine drift hits all alike: stock qvm-backup (real scrypt, gzip), qtb-pipe +
restic, qtb-pipe + borg (import-tar, the default) and qtb-pipe + borg (create -), the captured stream
fed straight to `restic backup --stdin` / `borg create -`, and the raw volume files backed up as
files. Then restores. Results: results.json, results.md, PNG charts in benchmarks/results/<date>/.
`--smoke` runs the same code on a tiny workload (the test suite runs it so this never rots).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qtb_pipe import runs

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
ENGINE_PW = "benchmark engine password"
# the project's restic lives next to this python (make setup), the system's borg on PATH
os.environ["PATH"] = f"{BIN}:{os.environ.get('PATH', '')}"
QTB_CONFIGS = {  # name -> (engine, adapter settings)
    "qtb+restic": ("restic", []),
    "qtb+borg": ("borg", []),  # import-tar, the adapter's default
    "qtb+borg-create": ("borg", ["--set", "store_method=create"]),
}
DIRECT_LABEL = {"restic": "direct restic --stdin", "borg": "direct borg create -"}
RESTIC_DIRECT = ("direct-restic", "raw-restic")  # the lower bounds' repositories
BORG_DIRECT = ("direct-borg", "raw-borg")


STARTED = time.monotonic()


def progress(text: str) -> None:
    print(f"bench: [{time.monotonic() - STARTED:6.1f} s] {text}", file=sys.stderr, flush=True)


# --- measuring processes ------------------------------------------------------------------
def classify(cmdline: list[str]) -> str:
    """The stage a process belongs to, from its command line (engines first: their command lines
    mention our paths and modules too)."""
    text = " ".join(cmdline)
    name = Path(cmdline[0]).name if cmdline else "?"
    script = Path(cmdline[1]).name if len(cmdline) > 1 and name.startswith("python") else ""
    for engine in ("restic", "borg", "gzip", "tar", "ssh"):
        if engine in (name, script):
            return engine
    if name == "scrypt" or (script == "scrypt" and "/usr/bin/" in cmdline[1]):
        return "real scrypt"
    if script == "scrypt":
        return "shim"
    if "qubes_sim.tools qvm-backup-restore" in text:
        return "qvm-backup-restore (emulated)"
    if "qubes_sim.tools qvm-backup" in text:
        return "qvm-backup (emulated qubesd)"
    if "qubes_sim" in text:
        return "qubes-sim (other)"
    if "qtb_adapters" in text or "qtb-adapter" in text:
        return "qtb-adapter"
    if "qtb-pipe" in text:
        return "qtb-pipe"
    return "other"


@dataclass
class Usage:
    cpu_s: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)

    def combine(self, other: Usage) -> Usage:
        """Two runs one after the other: CPU adds up, the peak is the higher one."""
        cpu = {k: self.cpu_s.get(k, 0.0) + other.cpu_s.get(k, 0.0) for k in {*self.cpu_s, *other.cpu_s}}
        rss = {
            k: max(self.peak_rss_mb.get(k, 0.0), other.peak_rss_mb.get(k, 0.0))
            for k in {*self.peak_rss_mb, *other.peak_rss_mb}
        }
        return Usage(cpu, rss)


class Sampler(threading.Thread):
    """Samples the process tree under a pid (20 Hz): CPU seconds and peak RSS per process class.
    Processes that live < 50 ms may be missed; CPU of the last interval of a process is lost."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.root = psutil, psutil.Process(pid)
        self.seen: dict[int, tuple[str, float, float]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except self.psutil.Error:
                break
            for p in procs:
                try:
                    with p.oneshot():
                        cls = classify(p.cmdline())  # again each time: the shim execs the real scrypt
                        t = p.cpu_times()
                        rss = p.memory_info().rss / 1e6
                except self.psutil.Error:
                    continue
                old = self.seen.get(p.pid, (cls, 0.0, 0.0))
                self.seen[p.pid] = (cls, t.user + t.system, max(old[2], rss))
            time.sleep(0.05)

    def usage(self) -> Usage:
        u = Usage()
        for cls, cpu, rss in self.seen.values():
            u.cpu_s[cls] = round(u.cpu_s.get(cls, 0.0) + cpu, 3)
            u.peak_rss_mb[cls] = round(max(u.peak_rss_mb.get(cls, 0.0), rss), 1)
        return u


@dataclass
class Step:
    config: str
    step: str
    seconds: float
    stream_bytes: int = 0
    repo_bytes: int = 0
    usage: Usage = field(default_factory=Usage)

    @property
    def mb_per_s(self) -> float:
        return self.stream_bytes / 1e6 / self.seconds if self.seconds else 0.0

    def cpu_s_per_gb(self) -> dict[str, float]:
        """CPU seconds per GB of this step's stream (raw-file rows: of the volumes), by stage."""
        gb = self.stream_bytes / 1e9
        return {k: round(v / gb, 2) for k, v in self.usage.cpu_s.items()} if gb else {}

    def as_json(self) -> dict:
        return {**asdict(self), "mb_per_s": round(self.mb_per_s, 1), "cpu_s_per_gb": self.cpu_s_per_gb()}


def timed(
    argv: list[str], env: dict | None = None, stdin=None, stdout=subprocess.DEVNULL
) -> tuple[float, Usage, bytes]:
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        env=env,
        stdin=stdin,
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
    )
    sampler = Sampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.monotonic() - start
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(
            f"benchmark step failed: {' '.join(argv[:8])}…: {err.decode(errors='replace')[-500:]}"
        )
    return seconds, sampler.usage(), out or b""


def run_together(jobs: list[list[str]], env: dict[str, str]) -> None:
    env = {**env, "BORG_PASSPHRASE": ENGINE_PW}
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for argv in jobs
    ]
    for argv, proc in zip(jobs, procs, strict=True):
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv[:8])}… failed: {err.decode(errors='replace')[-500:]}")


def du(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def md_section(title: str, text: str, header: str, align: str) -> list[str]:
    """The opening of a results.md section: title, what was run, a table's header and alignment."""
    return ["", f"## {title}", "", text, "", header, align]


def sim(*args: str, env: dict | None = None) -> bytes:
    return subprocess.run([str(BIN / "qubes-sim"), *args], check=True, capture_output=True, env=env).stdout


# --- the benchmark --------------------------------------------------------------------------
class Bench:
    def __init__(self, work: Path, size_mib: float, smoke: bool) -> None:
        self.work, self.smoke = work, smoke
        self.world = work / "world"
        self.steps: list[Step] = []
        self.env = dict(os.environ)
        if smoke:  # the same code path, but seconds instead of minutes
            self.env.update(QUBES_SIM_TEST_CHUNK_SIZE=str(4 << 20), QUBES_SIM_TEST_SCRYPT_MAXTIME="0.01")
        sim("init", str(self.world), "--size-mib", str(size_mib), "--seed", "5")
        self.volumes_bytes = sum(f.stat().st_size for f in (self.world / "dom0/var/lib/qubes").rglob("*.img"))
        self.home = self.world / "qubes/backup/home/user"
        (self.home / "pw").write_text(ENGINE_PW + "\n")
        self.run_dom0("qtb-pipe", "init", "--backup-qube", "backup")
        self.run_dom0("qtb-pipe", "install-shim")
        self.stock_pp = work / "stock-passphrase"
        self.stock_pp.write_text("a stock passphrase\n")

    def run_dom0(self, *cmd: str, inside: str | None = None) -> bytes:
        argv = (
            [str(BIN / "qubes-sim"), "run", str(self.world)]
            + (["--in", inside] if inside else [])
            + ["--", *cmd]
        )
        proc = subprocess.run(argv, capture_output=True, env=self.env)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.decode(errors='replace')[-500:]}")
        return proc.stdout

    def sim_argv(self, *cmd: str, inside: str | None = None) -> list[str]:
        return (
            [str(BIN / "qubes-sim"), "run", str(self.world)]
            + (["--in", inside] if inside else [])
            + ["--", *cmd]
        )

    def setup_repos(self, configs: tuple[str, ...] = tuple(QTB_CONFIGS), raw_files: bool = True) -> None:
        """Initialise the repositories (at once, but restic ones one by one: see below)."""
        self.adapter_cfg = {name: self.home / f".config/qtb-pipe/{name}.toml" for name in configs}
        jobs = [
            self.sim_argv(
                "qtb-adapter",
                "init",
                "--config",
                str(self.adapter_cfg[name]),
                "--engine",
                QTB_CONFIGS[name][0],
                "--repo",
                str(self.home / f"repo-{name}"),
                "--password-file",
                str(self.home / "pw"),
                *QTB_CONFIGS[name][1],
                inside="backup",
            )
            for name in configs
        ]
        restic_adapter = [argv for argv in jobs if "restic" in argv]
        pw = str(self.home / "pw")
        # The same chunker polynomial as the adapter's repository (restic picks one at random
        # per repository), so growth compares the data, not two chunkings of it. borg has no
        # such option: its chunker seed is random per repository (results.md says how much
        # that moves its figures).
        source = ["--from-repo", str(self.home / "repo-qtb+restic"), "--from-password-file", pw]
        copy = [*source, "--copy-chunker-params"] if restic_adapter and not self.smoke else []
        restic_direct = [
            ["restic", "init", "-r", str(self.work / r), "--password-file", pw, *copy]
            for r in RESTIC_DIRECT
            if raw_files or not r.startswith("raw")
        ]
        jobs += [
            ["borg", "init", "-e", "repokey-blake2", str(self.work / r)]
            for r in BORG_DIRECT
            if raw_files or not r.startswith("raw")
        ]
        others = [argv for argv in jobs if argv not in restic_adapter]
        if self.smoke:  # nothing is measured: all at once
            run_together(others + restic_adapter + restic_direct, self.env)
            return
        # restic sizes its key derivation to the machine's speed at init (~0.5 s then): made while
        # other inits run, a repository gets a cheaper one, and its runs look faster. So restic's are
        # made one at a time on an otherwise idle machine (borg's is fixed).
        run_together(others, self.env)
        for argv in restic_adapter + restic_direct:
            run_together([argv], self.env)

    def use_adapter_config(self, name: str) -> None:
        """The driver's --engine picks the adapter's default config: point it at this configuration's."""
        link = self.home / ".config/qtb-pipe/adapter.toml"
        link.unlink(missing_ok=True)
        link.symlink_to(self.adapter_cfg[name])

    def stock(self, state: str) -> None:
        target = self.home / "stock"
        target.mkdir(exist_ok=True)
        seconds, usage, _ = timed(
            self.sim_argv("qvm-backup", "-y", "-p", str(self.stock_pp), "-d", "backup", str(target)),
            env=self.env,
        )
        newest = max(target.iterdir(), key=lambda p: p.stat().st_mtime)
        self.steps.append(Step("stock", state, seconds, newest.stat().st_size, du(target), usage))

    def qtb(self, name: str, state: str) -> None:
        engine = QTB_CONFIGS[name][0]
        self.use_adapter_config(name)
        # --full: every qube streams again, what the engine's deduplication is measured on (the nightly
        # run that skips unchanged qubes is the "typical night" scenario)
        seconds, usage, out = timed(
            self.sim_argv("qtb-pipe", "backup", "--engine", engine, "--full", "--json"),
            env=self.env,
            stdout=None,
        )
        result = json.loads(out)
        self.last_snapshots = getattr(self, "last_snapshots", {})
        self.last_snapshots[name] = result["snapshots"]
        self.steps.append(
            Step(name, state, seconds, result["stream_bytes"], du(self.home / f"repo-{name}"), usage)
        )

    def capture_stream(self, state: str) -> Path:
        """The uncompressed stream exactly as qtb-pipe sends it (shim in place, a qtb run)."""
        token = secrets.token_hex(16)
        run_dir = self.world / "dom0/var/lib/qtb-pipe/runs" / token
        run_dir.mkdir(parents=True)
        secret = bytes.fromhex((self.world / "dom0/etc/qtb-pipe/secret").read_text().strip())
        pp = self.work / "capture-pp"
        pp.write_text(runs.make_user_passphrase(token, secret) + "\n")
        out = self.work / f"stream-{state}"
        self.run_dom0(
            "qvm-backup",
            "-y",
            "--no-compress",
            "-p",
            str(pp),
            "-d",
            "backup",
            f"dd of={out} bs=1M status=none",
        )
        shutil.rmtree(run_dir)
        return out

    def lower_bound(
        self, label: str, repo: str, state: str, size: int, inputs: list[str], stdin: Path | None = None
    ) -> None:
        """The engine itself, with our settings for it: fed the captured stream, or given the files."""
        target = str(self.work / repo)
        if repo.endswith("restic"):
            argv = ["restic", "-r", target, "--password-file", str(self.home / "pw"), "backup", *inputs]
        else:  # the adapter's borg settings
            chunker = ["--chunker-params", "buzhash,19,23,20,4095", "--compression", "lz4"]
            argv = ["borg", "create", *chunker, f"{target}::{state}", *inputs]
        with open(stdin, "rb") if stdin else contextlib.nullcontext() as source:
            seconds, usage, _ = timed(argv, stdin=source, env={**os.environ, "BORG_PASSPHRASE": ENGINE_PW})
        self.steps.append(Step(label, state, seconds, size, du(self.work / repo), usage))

    def direct(self, stream: Path, state: str) -> None:
        size = stream.stat().st_size
        stdin_args = ["--stdin", "--stdin-filename", "stream"]
        self.lower_bound(DIRECT_LABEL["restic"], "direct-restic", state, size, stdin_args, stream)
        self.lower_bound(DIRECT_LABEL["borg"], "direct-borg", state, size, ["-"], stream)

    def raw(self, state: str) -> None:
        sources = [str(self.world / "dom0/var/lib/qubes"), str(self.world / "dom0/home")]
        self.lower_bound("raw files restic", "raw-restic", state, self.volumes_bytes, sources)
        self.lower_bound("raw files borg", "raw-borg", state, self.volumes_bytes, sources)

    def restores(self, configs: tuple[str, ...] = tuple(QTB_CONFIGS), two_pass: bool = True) -> None:
        for name in configs:
            engine = QTB_CONFIGS[name][0]
            self.use_adapter_config(name)
            snaps = self.last_snapshots[name]
            stream_bytes = next(s.stream_bytes for s in reversed(self.steps) if s.config == name)
            # the whole system: every snapshot of the last backup (one per qube, one stock restore each;
            # `restore --all` would pick them from dom0's records, which here mix the configurations);
            # smoke: the two-pass restore is the same code with one more qvm-backup-restore run per snapshot
            for mode in ("--single-pass", None) if two_pass and not self.smoke else ("--single-pass",):
                seconds, usage = 0.0, Usage()
                for snap in snaps:
                    argv = ["qtb-pipe", "restore", snap, "--engine", engine, "--rename-conflicting"]
                    took, used, _ = timed(self.sim_argv(*argv, *([mode] if mode else [])), env=self.env)
                    seconds, usage = seconds + took, usage.combine(used)
                label = "restore (1 pass)" if mode else "restore (verify + restore)"
                self.steps.append(Step(name, label, seconds, stream_bytes, 0, usage))
            dump = " && ".join(f"qtb-adapter dump {snap} --engine {engine}" for snap in snaps)
            seconds, usage, _ = timed(self.sim_argv("sh", "-c", dump, inside="backup"), env=self.env)
            self.steps.append(Step(name, "engine dump (via adapter)", seconds, stream_bytes, 0, usage))


def ratios(steps: list[Step]) -> dict:
    def get(config: str, step: str) -> Step | None:
        return next((s for s in steps if s.config == config and s.step == step), None)

    out: dict = {}
    stock_full = get("stock", "full")
    stock_total = sum(s.stream_bytes for s in steps if s.config == "stock")
    for name in QTB_CONFIGS:
        full, inc, same = get(name, "full"), get(name, "incremental"), get(name, "unchanged")
        if not (full and inc and same):
            continue
        r = {
            "growth_incremental_pct": round(100 * (inc.repo_bytes - full.repo_bytes) / inc.stream_bytes, 3),
            "growth_unchanged_pct": round(100 * (same.repo_bytes - inc.repo_bytes) / same.stream_bytes, 3),
            "repo_after_3_bytes": same.repo_bytes,
        }
        if stock_full:
            r["speed_vs_stock_full"] = round(stock_full.seconds / full.seconds, 2)
            r["size_vs_stock_full"] = round(stock_full.stream_bytes / full.repo_bytes, 2)
            r["size_vs_stock_after_3"] = round(stock_total / same.repo_bytes, 2)
        engine = QTB_CONFIGS[name][0]
        direct = get(DIRECT_LABEL[engine], "full")
        if direct:
            r["throughput_vs_engine_direct_full"] = round(full.mb_per_s / direct.mb_per_s, 3)
        raw_full, raw_inc = get(f"raw files {engine}", "full"), get(f"raw files {engine}", "incremental")
        if raw_full and raw_inc and raw_inc.repo_bytes > raw_full.repo_bytes:
            r["incremental_growth_vs_raw_files"] = round(
                (inc.repo_bytes - full.repo_bytes) / (raw_inc.repo_bytes - raw_full.repo_bytes), 3
            )
        one, dump = get(name, "restore (1 pass)"), get(name, "engine dump (via adapter)")
        if one and dump:
            r["restore_vs_engine_dump"] = round(one.mb_per_s / dump.mb_per_s, 3)
        out[name] = r
    return out


def write_results(
    out_dir: Path,
    meta: dict,
    steps: list[Step],
    shim: dict,
    memory: dict,
    quarter: list[Step],
    night: dict,
    night_30: dict,
    formats: dict,
    load: dict,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": meta,
        "steps": [s.as_json() for s in steps],
        "quarter_size_steps": [s.as_json() for s in quarter],
        "ratios": ratios(steps),
        "marginal": marginal(steps, quarter),
        "shim": shim["one_chunk"],
        "shim_plan_stress": shim["plan_stress"],
        "memory_two_sizes": memory,
        "typical_night": night,
        "typical_night_30_qubes": night_30,
        "inner_formats": formats,
        "many_nights": load,
    }
    (out_dir / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        f"# qtb-pipe benchmark, {meta['date']}",
        "",
        f"Workload: {meta['volumes_mib']:.0f} MiB of volumes (qubes-sim seed 5), states full → 2% changed → "
        f"unchanged. Machine: {meta['machine']}.",
        "",
        "| config | step | seconds | MB/s | stream | repository after | CPU s per GB, by stage "
        "| peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for s in steps:
        cpu = ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(s.cpu_s_per_gb().items(), key=lambda kv: -kv[1])[:4]
        )
        rss = ", ".join(
            f"{k} {v:.0f}" for k, v in sorted(s.usage.peak_rss_mb.items(), key=lambda kv: -kv[1])[:3]
        )
        lines.append(
            f"| {s.config} | {s.step} | {s.seconds:.1f} | {s.mb_per_s:.0f} "
            f"| {s.stream_bytes / 2**20:.0f} MiB | {s.repo_bytes / 2**20:.1f} MiB | {cpu} | {rss} |"
        )
    lines += ["", "## Ratios", "", "```", json.dumps(data["ratios"], indent=2), "```"]
    lines += [
        "",
        "## Per-byte speed (this size against a quarter of it: fixed per-run costs cancel)",
        "",
        "MB/s on the bytes the full-size run has beyond the quarter-size run's.",
        "",
        "| config | backup | engine direct | ratio | restore (1 pass) | engine dump | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in data["marginal"].items():
        cells = [m[k] for k in MARGINAL_KEYS]
        lines.append(f"| {name} | " + " | ".join("–" if c is None else str(c) for c in cells) + " |")
    if shim["one_chunk"]:
        lines += ["", "## Shim, one chunk", "", "| op | tool | MB/s |", "|---|---|---:|"]
        lines += [f"| {r['operation']} | {r['tool']} | {r['mb_per_s']:.0f} |" for r in shim["one_chunk"]]
    stress = shim["plan_stress"]
    lines += [
        "",
        f"## Shim, a restore plan of {stress['chunks']:,} chunks (issue 14)",
        "",
        f"`scrypt dec` of the plan's first chunk {stress['first_chunk_s'] * 1000:.1f} ms, of its last "
        f"{stress['last_chunk_s'] * 1000:.1f} ms (×{stress['last_vs_first']}): the shim's work per chunk "
        "does not grow with the plan (best of 5, a 4 KiB chunk, the accepted count as if every chunk "
        "before it was accepted).",
    ]
    if memory:
        lines += [
            "",
            "## Peak RSS (MB) of our processes at two workload sizes",
            "",
            "```",
            json.dumps(memory, indent=2),
            "```",
        ]
    from benchmarks.formats import formats_markdown
    from benchmarks.load import load_markdown
    from benchmarks.night import night_markdown

    lines += night_markdown(night, night_30) + formats_markdown(formats) + load_markdown(load)
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    charts(out_dir, steps)


def charts(out_dir: Path, steps: list[Step]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fulls = [s for s in steps if s.step == "full"]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh([s.config for s in fulls], [s.mb_per_s for s in fulls], color="#4a7ab5")
    ax.set_xlabel("MB/s of stream (full backup)")
    ax.set_title("Full backup throughput")
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(9, 4))
    for config in dict.fromkeys(s.config for s in steps if s.step in ("full", "incremental", "unchanged")):
        series = [s for s in steps if s.config == config and s.step in ("full", "incremental", "unchanged")]
        sizes = [s.repo_bytes / 2**20 for s in series]
        ax.plot([s.step for s in series], sizes, marker="o", label=config)
    ax.set_ylabel("repository / archive size, MiB")
    ax.set_title("Storage over three backups")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "repository-size.png", dpi=110)
    plt.close(fig)


MARGINAL_CONFIGS = ("qtb+restic", "qtb+borg")  # the defaults, also run at a quarter of the size


def quarter_size_run(work: Path, size_mib: float, smoke: bool) -> list[Step]:
    """Full backups of a world a quarter the size: peak memory at two sizes, and (with the main
    run) the per-byte speed of our pipe against the engine fed directly, without fixed costs."""
    bench = Bench(work, size_mib, smoke)
    bench.setup_repos(MARGINAL_CONFIGS, raw_files=False)
    for name in MARGINAL_CONFIGS:
        bench.qtb(name, "full")
    stream = bench.capture_stream("full")
    bench.direct(stream, "full")
    bench.restores(MARGINAL_CONFIGS, two_pass=False)
    return bench.steps


MARGINAL_KEYS = (  # the columns of the per-byte table, in order
    "marginal_mb_per_s",
    "engine_direct_marginal_mb_per_s",
    "marginal_throughput_vs_engine_direct",
    "restore_marginal_mb_per_s",
    "dump_marginal_mb_per_s",
    "marginal_restore_vs_engine_dump",
)


def _mb(rate: float | None) -> float | None:
    return round(rate / 1e6, 1) if rate else None


def marginal(main_steps: list[Step], quarter_steps: list[Step]) -> dict:
    """Throughput on the bytes the full-size run has beyond the quarter run's: fixed per-run costs
    (engine starts, key derivations, qube and process starts) cancel out."""

    def rate(config: str, step: str = "full") -> float | None:
        big = next((s for s in main_steps if s.config == config and s.step == step), None)
        small = next((s for s in quarter_steps if s.config == config and s.step == step), None)
        if not (big and small) or big.seconds <= small.seconds:
            return None
        return (big.stream_bytes - small.stream_bytes) / (big.seconds - small.seconds)

    out: dict = {}
    for name in MARGINAL_CONFIGS:
        engine = QTB_CONFIGS[name][0]
        ours, direct = rate(name), rate(DIRECT_LABEL[engine])
        restore, dump = rate(name, "restore (1 pass)"), rate(name, "engine dump (via adapter)")
        out[name] = {
            "marginal_mb_per_s": _mb(ours),
            "engine_direct_marginal_mb_per_s": _mb(direct),
            "marginal_throughput_vs_engine_direct": round(ours / direct, 3) if ours and direct else None,
            "restore_marginal_mb_per_s": _mb(restore),
            "dump_marginal_mb_per_s": _mb(dump),
            "marginal_restore_vs_engine_dump": round(restore / dump, 3) if restore and dump else None,
        }
    return out


def parse_size(text: str) -> float:
    """MiB from 512M, 1G, 1.5G or a plain number of MiB."""
    units = {"M": 1, "G": 1024, "T": 1024 * 1024}
    number, unit = (text[:-1], text[-1].upper()) if text[-1:].upper() in units else (text, "M")
    try:
        mib = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 1G, 20G)") from None
    if not 8 <= mib <= 1024 * 1024:
        raise argparse.ArgumentTypeError(f"size out of range: {text!r} (8M to 1T)")
    return mib


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--size",
        type=parse_size,
        default=1024.0,
        help="volumes of the workload, e.g. 512M, 1G (default), 20G",
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny workload, fast settings: checks the code path only"
    )
    p.add_argument("--out", type=Path, help="results directory (default benchmarks/results/<date>)")
    p.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    size = 12.0 if args.smoke else args.size
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    out_dir = args.out or HERE / "results" / (stamp + ("-smoke" if args.smoke else ""))
    work = Path(tempfile.mkdtemp(prefix="qtb-bench-", dir=args.work))
    started = time.monotonic()
    quarter: list[Step] = []

    def run_quarter() -> None:
        try:
            quarter.extend(quarter_size_run(work / "quarter", size / 4, args.smoke))
        except SystemExit as e:  # a thread drops SystemExit silently: say why here
            print(f"bench: quarter-size run: {e}", file=sys.stderr)

    quarter_thread = threading.Thread(target=run_quarter, daemon=True)
    try:
        if args.smoke:  # nothing is measured: run it alongside, to stay well under a minute
            quarter_thread.start()
        progress("building the workload")
        bench = Bench(work / "main", size, args.smoke)
        progress("initialising repositories")
        bench.setup_repos()
        for state in ("full", "incremental", "unchanged"):
            if state == "incremental":
                sim("mutate", str(bench.world), "--percent", "2", "--seed", "9")
            progress(f"state {state}")
            bench.stock(state)
            for name in QTB_CONFIGS:
                bench.qtb(name, state)
            progress("capturing the stream for the direct runs")
            stream = bench.capture_stream(state)
            bench.direct(stream, state)
            stream.unlink()
            progress("raw files")
            bench.raw(state)
        progress("restores")
        bench.restores()
        progress("a typical night")
        from benchmarks.night import MORE_APPVMS, typical_night

        night = typical_night(work / "night", size, bench.env)
        progress(f"the typical night on {MORE_APPVMS} more qubes")
        night_30 = typical_night(work / "night-30", size, bench.env, 2 if args.smoke else MORE_APPVMS)
        progress("inner formats: LVM thin (qubes.tarwriter) and file pools (GNU tar)")
        from benchmarks.formats import inner_formats

        formats = inner_formats(work / "formats", size / 4, bench.env)
        progress("many nights in a row")
        from benchmarks.load import many_nights

        nights = 3 if args.smoke else 30
        load = {e: many_nights(work / "load" / e, bench.env, e, nights) for e in ("restic", "borg")}
        progress("shim micro-benchmark")
        from benchmarks.shim_bench import run_plan_stress, run_shim_benchmark

        shim_size = (4 if args.smoke else 100) << 20
        shim_results = [
            {**asdict(r), "mb_per_s": round(r.mb_per_s, 1)}
            for r in run_shim_benchmark(shim_size, include_real=not args.smoke, work=work)
        ]
        progress("shim: a restore plan of many chunks (its work per chunk must not grow with the plan)")
        plan_chunks = 200 if args.smoke else 10_000
        timed = run_plan_stress(plan_chunks, work=work)
        plan_stress = {"chunks": plan_chunks, **{k.replace(" ", "_") + "_s": v for k, v in timed.items()}}
        plan_stress["last_vs_first"] = round(timed["last chunk"] / timed["first chunk"], 2)
        if not args.smoke:
            progress("full backups at a quarter of the size")
            quarter_thread.start()
        quarter_thread.join()
        if not quarter:
            raise SystemExit("bench: the quarter-size run failed (see above)")

        def peak_rss(steps: list[Step]) -> dict[str, float]:
            out: dict[str, float] = {}
            for step in steps:
                if step.config in MARGINAL_CONFIGS and step.step == "full":
                    for cls, mb in step.usage.peak_rss_mb.items():
                        out[cls] = max(out.get(cls, 0.0), mb)
            return out

        memory = {f"{size / 4:.0f} MiB": peak_rss(quarter), f"{size:.0f} MiB": peak_rss(bench.steps)}
        meta = {
            "date": stamp,
            "volumes_mib": bench.volumes_bytes / 2**20,
            "smoke": args.smoke,
            "machine": f"{os.cpu_count()} cores",
            "seconds": round(time.monotonic() - started, 1),
            "stream_note": "stream = uncompressed qvm-backup stream incl. the shim's 56-byte trailers",
        }
        shim = {"one_chunk": shim_results, "plan_stress": plan_stress}
        write_results(out_dir, meta, bench.steps, shim, memory, quarter, night, night_30, formats, load)
        print(f"bench: results in {out_dir} ({meta['seconds']} s)", file=sys.stderr)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
