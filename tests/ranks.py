"""Launching `ddil` as 2 real processes (gloo on CPU) through tests/mp_distill.py, and comparing
what the ranks trained: the multi-process tests' one recipe."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def launch(launcher: str, dump: Path, args: list[str], env: dict | None = None,
           expect: int = 0) -> subprocess.CompletedProcess:
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        if shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists():
            pytest.skip("accelerate's launcher is not installed")
        # --cpu would silently run one process; --multi_gpu with Accelerator(cpu=True) runs two
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29517"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]),
           **(env or {})}
    proc = subprocess.run([*cmd, str(HERE / "mp_distill.py"), str(dump), *args], capture_output=True, text=True,
                          env=env, timeout=400)
    if expect == 0:
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        assert proc.returncode != 0, "the run was meant to stop early"
    return proc


def assert_ranks_identical(dump: Path, phases: list[str], names=("student",)) -> None:
    for phase in phases:
        for name in names:
            rank0 = load_file(str(dump / f"rank0-{phase}-{name}.safetensors"))
            rank1 = load_file(str(dump / f"rank1-{phase}-{name}.safetensors"))
            for key in rank0:
                assert torch.allclose(rank0[key], rank1[key], atol=1e-6, rtol=0), (phase, name, key)
