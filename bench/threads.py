"""torch CPU threads vs a busy core: seconds per small training step with 1, 2, ... threads.

One step is what a distillation update costs on the embedded digits teacher: a teacher x0
prediction (no grad, CFG) and a student forward, backward and Adam step on a batch of 32 states.
Each thread count runs in a fresh process (torch's thread pool is fixed once it has run), in
turns, so slow phases of the machine's other load hit every setting alike. `--busy` adds one
process that spins on a core for the whole measurement, as another job on a shared machine does.
This measured the default of `ddil --threads` (cli/common.py `default_threads`).

    python bench/threads.py --busy            # 1 vs 2 threads beside one busy process
    python bench/threads.py --threads 1 2 --rounds 3 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def one_run(threads: int, steps: int, batch: int) -> float:
    """Median seconds per step in this process with `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    from ddil_cli.models import load_denoiser, make_student

    torch.manual_seed(0)
    teacher = load_denoiser("embedded:digits")
    student = make_student(teacher)
    opt = torch.optim.Adam(student.network.parameters(), lr=1e-4)
    cond = teacher.encode(["a handwritten digit three"] * batch)
    x_t = torch.randn(batch, *teacher.state_shape)
    t = torch.full((batch,), 500, dtype=torch.long)
    times = []
    for _ in range(steps + 1):  # the first step warms up and is not counted
        start = time.perf_counter()
        with torch.no_grad():
            target = teacher.predict_x0(x_t, t, cond, guidance=1.5)
        loss = (student.predict_x0(x_t, t, cond, guidance=1.0) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per thread count")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per process")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--busy", action="store_true", help="keep one other process spinning on a core")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps({"seconds": one_run(args.child, args.steps, args.batch)}))
        return
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    results: dict[int, list[float]] = {n: [] for n in args.threads}
    try:
        for _ in range(args.rounds):
            for n in args.threads:
                env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
                out = subprocess.run([sys.executable, __file__, "--child", str(n), "--steps", str(args.steps),
                                      "--batch", str(args.batch)], env=env, capture_output=True, text=True,
                                     check=True)
                results[n].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    load = os.getloadavg()[0]
    print(f"cores available: {len(os.sched_getaffinity(0))}, busy process: {bool(busy)}, "
          f"load average (1 min) at the end: {load:.2f}")
    print("| threads | s/step, median over rounds | each round |")
    print("|---|---|---|")
    for n, values in results.items():
        print(f"| {n} | {statistics.median(values):.3f} | {', '.join(f'{v:.3f}' for v in values)} |")


if __name__ == "__main__":
    main()
