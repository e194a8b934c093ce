"""Crash safety: SIGKILL `ddil distill` and `ddil collect` at random points and check recovery.

distill trial: a tiny lab run (gmm:ring:8, 32 updates, a checkpoint every 4) is started as its
own process and killed after a random delay once it has begun; `--resume latest` then finishes it
in this process, and the student must be bit-identical to an uninterrupted run's. (A run the
kill missed, because it had already finished, counts as a trial too: resuming it changes nothing.)

collect trial: a buffer gets one complete collect, then a collect killed at a random point, then
another complete collect. Every shard the manifest lists must read and match its sha256, no
partial file may remain, the first collect's shards must be byte-identical to before the kill,
and the last collect's shards byte-identical to those of the same run in a buffer where the
middle collect was never interrupted (a collect's states depend on its run number, not on what
happened to earlier runs).

    python bench/crash.py                # 12 distill + 12 collect trials, a table
    python bench/crash.py --trials 20
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DISTILL = ["--method", "pd", "--teacher", "gmm:ring:8", "--teacher-steps", "8", "--steps", "4",
           "--max-updates", "32", "--batch-size", "16", "--collect-every", "8", "--rollouts-per-collect", "8",
           "--checkpoint-every", "4", "--keep-checkpoints", "2", "--log-every", "4", "--seed", "3", "--quiet"]
COLLECT = ["--teacher", "gmm:ring:8", "--prior", "data=0.5,teacher=0.5", "--steps", "2", "--teacher-steps", "4",
           "--batch-size", "8", "--shard-samples", "16", "--seed", "5", "--quiet"]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def cli(argv: list[str]) -> None:
    """Run `ddil ARGV` in this process (fast: the imports are paid once); raise unless it exits 0."""
    from ddil_cli.cli.app import main

    try:
        main(list(argv))
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"ddil {' '.join(argv)} exited {exc.code}") from None


def kill_after(argv: list[str], started: Path, delay: float, timeout: float = 120) -> bool:
    """Start `ddil ARGV` as a process; once `started` exists wait `delay` s and SIGKILL it.
    Returns whether it was killed (False: it had finished first)."""
    proc = subprocess.Popen([sys.executable, "-m", "ddil_cli", *argv], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while not started.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is not None:
            return False
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_digests(folder: Path, pattern: str = "*") -> dict[str, str]:
    return {p.name: digest(p) for p in sorted(Path(folder).glob(pattern)) if p.is_file()}


# ---- distill ----------------------------------------------------------------------------------
def distill_reference(tmp: Path) -> dict[str, str]:
    out = tmp / "distill-reference"
    if not (out / "student").is_dir():
        cli(["distill", *DISTILL, "--out", str(out)])
    return folder_digests(out / "student", "*.safetensors")


def distill_trial(tmp: Path, delay: float, reference: dict[str, str]) -> dict:
    out = tmp / f"distill-{delay:.3f}"
    shutil.rmtree(out, ignore_errors=True)
    killed = kill_after(["distill", *DISTILL, "--out", str(out)], out / "manifest.json", delay)
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) if killed else []
    cli(["distill", *DISTILL, "--out", str(out), "--resume", "latest"])
    equal = folder_digests(out / "student", "*.safetensors") == reference
    shutil.rmtree(out, ignore_errors=True)
    return {"command": "distill", "delay_s": delay, "killed": killed,
            "state": checkpoints[-1] if checkpoints else ("finished" if not killed else "no checkpoint"),
            "equal": equal}


# ---- collect ----------------------------------------------------------------------------------
def buffer_consistent(root: Path, *, settled: bool = True) -> bool:
    """Every listed shard exists, reads as a complete tar and matches its sha256. `settled` (after
    a later collect has opened the buffer): no partial file either, and no shard the manifest
    lacks (right after a kill both may exist: the next writer removes the one, adopts the other)."""
    from ddil_cli.buffer import load_manifest
    from ddil_cli.buffer.writer import shard_counts

    manifest = load_manifest(root)
    for shard in manifest["shards"]:
        path = root / shard["name"]
        if not path.is_file() or digest(path) != shard["sha256"]:
            return False
        try:  # reads every record's metadata: a truncated tar raises
            if shard_counts(root, shard["name"])[0] != shard["samples"]:
                return False
        except (tarfile.TarError, OSError, ValueError):
            return False
    return not settled or (not list(root.glob(".*.partial")) and
                           sorted(p.name for p in root.glob("shard-*.tar")) == sorted(s["name"] for s in manifest["shards"]))


def collect_reference(tmp: Path) -> dict[str, str]:
    out = tmp / "collect-reference"
    if not out.is_dir():
        for rollouts in ("8", "256", "8"):
            cli(["collect", *COLLECT, "--rollouts", rollouts, "--out", str(out)])
    return folder_digests(out, "shard-*.tar")


def collect_trial(tmp: Path, delay: float, reference: dict[str, str]) -> dict:
    out = tmp / f"collect-{delay:.3f}"
    shutil.rmtree(out, ignore_errors=True)
    cli(["collect", *COLLECT, "--rollouts", "8", "--out", str(out)])
    first = folder_digests(out, "shard-0000-*.tar")
    # started: the killed run's first shard is being written
    killed = kill_after(["collect", *COLLECT, "--rollouts", "256", "--out", str(out)],
                        out / ".shard-0001-000-000000.tar.partial", delay)
    consistent = buffer_consistent(out, settled=False)
    cli(["collect", *COLLECT, "--rollouts", "8", "--out", str(out)])
    after = folder_digests(out, "*.tar")
    last_run = {n: d for n, d in after.items() if n.startswith("shard-0002-")}
    equal = (consistent and buffer_consistent(out) and {n: after[n] for n in first} == first
             and last_run == {n: d for n, d in reference.items() if n.startswith("shard-0002-")} and bool(last_run))
    shutil.rmtree(out, ignore_errors=True)
    return {"command": "collect", "delay_s": delay, "killed": killed,
            "state": f"{len([n for n in after if n.startswith('shard-0001-')])} shard(s) of the killed run kept",
            "equal": equal}


def run_trials(trials: int, seed: int = 0, tmp: Path | None = None, commands=("distill", "collect")) -> list[dict]:
    rng = random.Random(seed)
    tmp = Path(tmp or tempfile.mkdtemp(prefix="ddil-crash-"))
    rows = []
    if "distill" in commands:
        reference = distill_reference(tmp)
        rows += [distill_trial(tmp, round(rng.uniform(0.0, 4.0), 3), reference) for _ in range(trials)]
    if "collect" in commands:
        reference = collect_reference(tmp)
        rows += [collect_trial(tmp, round(rng.uniform(0.0, 1.0), 3), reference) for _ in range(trials)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12, help="trials per command")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    args = parser.parse_args()
    start = time.time()
    rows = run_trials(args.trials, args.seed)
    print("| command | kill after (s) | killed | state at the kill | resumed equals uninterrupted |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['command']} | {r['delay_s']:.3f} | {'yes' if r['killed'] else 'no (had finished)'} | "
              f"{r['state']} | {'yes' if r['equal'] else 'NO'} |")
    killed = sum(r["killed"] for r in rows)
    print(f"\n{len(rows)} trials, {killed} killed mid-run, {sum(r['equal'] for r in rows)} equal "
          f"({time.time() - start:.0f} s)")
    sys.exit(0 if all(r["equal"] for r in rows) else 1)


if __name__ == "__main__":
    main()
