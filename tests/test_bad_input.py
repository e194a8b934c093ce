"""Bad input to every command: exit code 2, exactly one `error:` line, no traceback, and nothing
that already existed changed (a snapshot of every file before and after). Plus a full disk, and
SIGKILLs of distill and collect at random points that resume to the uninterrupted result."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from cli_runner import run_cli

ROOT = Path(__file__).resolve().parent.parent
LAB_RUN = ["--teacher", "gmm:ring:8", "--teacher-steps", "8", "--steps", "4", "--max-updates", "10",
           "--batch-size", "16", "--collect-every", "5", "--rollouts-per-collect", "4", "--checkpoint-every", "5",
           "--keep-checkpoints", "3", "--quiet"]
CKPT = "checkpoints/checkpoint-00000010"


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _ok(argv: list[str]) -> None:
    code, err = run_cli(argv, None)
    assert code == 0, argv


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Pre-existing outputs and broken files every case may point at."""
    w = tmp_path_factory.mktemp("world")
    _ok(["distill", *LAB_RUN, "--out", str(w / "run")])
    _ok(["distill", *LAB_RUN, "--teacher", "gmm:ring:8:d8", "--out", str(w / "run_d8")])
    _ok(["sample", "--teacher", "gmm:ring:8", "--teacher-steps", "8", "--num-per-prompt", "2", "--quiet",
         "--out", str(w / "samples")])
    _ok(["collect", "--teacher", "gmm:ring:8", "--prior", "teacher=1", "--rollouts", "4", "--steps", "2",
         "--teacher-steps", "4", "--shard-samples", "2", "--quiet", "--out", str(w / "buffer")])
    weights = "model.safetensors"
    # damaged copies
    for name in ("run_badmanifest", "run_truncated", "run_unfinished"):
        shutil.copytree(w / "run", w / name)
    (w / "run_badmanifest/manifest.json").write_text('{"config": ')
    data = (w / "run" / CKPT / "student.safetensors").read_bytes()
    (w / "run_truncated" / CKPT / "student.safetensors").write_bytes(data[:len(data) // 2])
    for sub in ("stages", "student"):  # a run killed in its last phase: the resume must load a checkpoint
        shutil.rmtree(w / "run_unfinished" / sub)
    for name in ("student_truncated", "student_badjson", "student_badconfig"):
        shutil.copytree(w / "run/student", w / name)
    (w / "student_truncated" / weights).write_bytes((w / "run/student" / weights).read_bytes()[:300])
    (w / "student_badjson/ddil_mlp.json").write_text("{nope")
    (w / "student_badconfig/ddil_mlp.json").write_text('{"dim": 2}')
    for name in ("samples_badnpy", "samples_badjsonl"):
        shutil.copytree(w / "samples", w / name)
    (w / "samples_badnpy/states.npy").write_bytes((w / "samples/states.npy").read_bytes()[:40])
    with open(w / "samples_badjsonl/samples.jsonl", "a") as f:
        f.write("not json\n")
    shutil.copytree(w / "buffer", w / "buffer_badmanifest")
    (w / "buffer_badmanifest/manifest.json").write_text("[1, 2")
    # image-caption shards, good and broken, and an image sample folder
    with wds.TarWriter(str(w / "tiny.tar")) as sink:
        for i in range(6):
            sink.write({"__key__": f"s{i:03d}", "png": _png(i), "txt": "a handwritten digit one"})
    (w / "random.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    (w / "truncated.tar").write_bytes((w / "tiny.tar").read_bytes()[:1500])
    (w / "images/images").mkdir(parents=True)
    with open(w / "images/samples.jsonl", "w") as f:
        for i in range(3):
            (w / f"images/images/{i:06d}.png").write_bytes(_png(10 + i))
            f.write(json.dumps({"index": i, "file": f"images/{i:06d}.png", "prompt": "x"}) + "\n")
    # config files and other inputs
    (w / "steps_text.toml").write_text('steps = "four"\n')
    (w / "steps_list.toml").write_text("steps = [4, 8]\n")
    (w / "lr_text.toml").write_text('lr = "fast"\n')
    (w / "batch_bool.toml").write_text("batch_size = true\n")
    (w / "betas_bools.toml").write_text("betas = [true, false]\n")
    (w / "guidance_nan.yaml").write_text("guidance: .nan\n")
    (w / "unknown_key.toml").write_text("stepz = 4\n")
    (w / "broken.yaml").write_text("steps: [4\n  x: 1\n")
    (w / "broken.toml").write_text("steps = \n")
    (w / "empty.txt").write_text("\n\n")
    (w / "binary.txt").write_bytes(b"\xab\xff\x00 not text")
    (w / "latin1.toml").write_bytes(b"\xff\xfe steps = 4\n")
    (w / "afile").write_text("a file, not a folder")
    (w / "bad_metrics.json").write_text("{")
    (w / "bad_stats.npz").write_bytes(b"not an npz")
    _second_round_world(w)
    yield w
    for handle in _HELD:
        handle.close()


_HELD = []  # the lock a "running" ddil process holds on {w}/held for the whole module


def _second_round_world(w: Path) -> None:
    """Inputs of the second reliability round: our own files with bad content, folders that
    overlap, an output another run holds."""
    from safetensors.torch import load_file, save_file

    from ddil_cli.atomic import lock_name
    from ddil_cli.models import EMBEDDED

    weights = "model.safetensors"
    student = w / "run/student"
    for name in ("student_noweights", "student_badpred", "student_10step", "student_nan"):
        shutil.copytree(student, w / name)
    (w / "student_noweights" / weights).unlink()
    config = json.loads((student / "ddil_mlp.json").read_text())
    (w / "student_badpred/ddil_mlp.json").write_text(json.dumps({**config, "prediction_type": "x0"}))
    (w / "student_10step/ddil_mlp.json").write_text(json.dumps(
        {**config, "scheduler_config": {**config["scheduler_config"], "num_train_timesteps": 10}}))
    tensors = load_file(str(student / weights))
    first = next(iter(tensors))
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, str(w / "student_nan" / weights))
    digits = EMBEDDED["embedded:digits"]
    for name in ("teacher_badbeta", "teacher_defaults_text", "teacher_defaults_nan"):
        shutil.copytree(digits, w / name)
    scheduler = json.loads((digits / "scheduler/scheduler_config.json").read_text())
    (w / "teacher_badbeta/scheduler/scheduler_config.json").write_text(json.dumps({**scheduler, "beta_schedule": "bogus"}))
    (w / "teacher_defaults_text/ddil_defaults.json").write_text('{"guidance": "high"}')
    (w / "teacher_defaults_nan/ddil_defaults.json").write_text('{"guidance": NaN}')
    manifest = json.loads((w / "buffer/manifest.json").read_text())
    for name, broken in (("buffer_noheader", {k: v for k, v in manifest.items() if k != "header"}),
                         ("buffer_shards_text", {**manifest, "shards": "all of them"})):
        shutil.copytree(w / "buffer", w / name)
        (w / name / "manifest.json").write_text(json.dumps(broken))
    rows = [json.loads(line) for line in (w / "samples/samples.jsonl").read_text().splitlines()]
    for name, edit in (("samples_rowtext", {"row": "a"}), ("samples_rowneg", {"row": -1}),
                       ("samples_barenan", {"guidance": float("nan")})):
        shutil.copytree(w / "samples", w / name)
        (w / name / "samples.jsonl").write_text("".join(json.dumps({**r, **edit}) + "\n" for r in rows))
    shutil.copytree(w / "samples", w / "samples_nan")
    states = np.load(w / "samples/states.npy")
    states[0, 0] = np.nan
    np.save(w / "samples_nan/states.npy", states)
    mu, sigma = np.zeros(4), np.eye(4)
    np.savez(w / "stats_badshape.npz", mu=mu, sigma=np.eye(3))
    np.savez(w / "stats_nan.npz", mu=np.full(4, np.nan), sigma=sigma)
    np.savez(w / "stats_badmeta.npz", mu=mu, sigma=sigma, meta=np.array("{not json"))
    (w / "shards").mkdir()
    shutil.copy(w / "tiny.tar", w / "shards/tiny.tar")
    (w / "cfgdir").mkdir()
    (w / "cfgdir/ok.toml").write_text("seed = 1\n")
    (w / "link_to_samples").symlink_to(w / "samples", target_is_directory=True)
    (w / "dangling").symlink_to(w / "nowhere")
    (w / "options_text.toml").write_text('options = "abc"\n')
    (w / "metrics_list.json").write_text('{"metrics": [1, 2]}')
    (w / "metrics_nan.json").write_text('{"metrics": {"quality": {"available": true, "value": NaN}}}')
    (w / "dup.yaml").write_text("steps: 4\nsteps: 8\n")
    (w / "class99.txt").write_text("class 99\n")
    shutil.copytree(w / "run", w / "run_foreignphase")
    state = json.loads((w / "run_foreignphase" / CKPT / "state.json").read_text())
    (w / "run_foreignphase" / CKPT / "state.json").write_text(json.dumps({**state, "phase": "dmd2-4"}))
    handle = open(lock_name(w / "held"), "a+")
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write(json.dumps({"pid": 4242, "command": "ddil sample", "started": "2026-01-01 00:00:00"}))
    handle.flush()
    _HELD.append(handle)


S = ["sample", "--quiet", "--teacher-steps", "8"]
C = ["collect", "--quiet", "--prior", "teacher=1", "--rollouts", "4", "--steps", "2", "--teacher-steps", "4"]
D = ["distill", *LAB_RUN]
E = ["evaluate", "--quiet"]
H = ["covariate-shift", "--quiet", "--teacher-steps", "8", "--num-per-prompt", "2", "--shift-samples", "16"]
T = ["teacher", "--quiet", "--steps", "1", "--batch-size", "2"]

# (id, argv with {w} = the world folder and {o} = a fresh --out, words the one line must hold)
CASES = [
    # sample
    ("sample-markup-path", [*S, "--teacher", "/nonexistent/[/x]", "--out", "{o}"], "/nonexistent/[/x]"),
    ("sample-lab-spec-literal", [*S, "--teacher", "gmm:ring:9x", "--out", "{o}"], "e.g. gmm:ring:8"),
    ("sample-guidance-nan", [*S, "--guidance", "nan", "--out", "{o}"], "finite"),
    ("sample-guidance-inf", [*S, "--guidance", "inf", "--out", "{o}"], "finite"),
    ("sample-guidance-negative", [*S, "--guidance", "-2", "--out", "{o}"], "--guidance"),
    ("sample-steps-0", [*S, "--steps", "0", "--student", "{w}/run/student", "--out", "{o}"], "--steps"),
    ("sample-teacher-steps-huge", [*S, "--teacher-steps", "5000", "--out", "{o}"], "--teacher-steps"),
    ("sample-steps-not-dividing", [*S, "--steps", "3", "--student", "{w}/run/student", "--out", "{o}"], "divides"),
    ("sample-steps-text", [*S, "--steps", "four", "--out", "{o}"], "--steps"),
    ("sample-teacher-prob-range", [*S, "--teacher-prob", "1.5", "--student", "{w}/run/student", "--out", "{o}"],
     "[0, 1]"),
    ("sample-teacher-prob-nan", [*S, "--teacher-prob", "nan", "--out", "{o}"], "finite"),
    ("sample-batch-0", [*S, "--batch-size", "0", "--out", "{o}"], "--batch-size"),
    ("sample-batch-absurd", [*S, "--batch-size", "10000000000", "--out", "{o}"], "--batch-size"),
    ("sample-num-per-prompt-negative", [*S, "--num-per-prompt", "-3", "--out", "{o}"], "--num-per-prompt"),
    ("sample-seed-negative", [*S, "--seed", "-1", "--out", "{o}"], "--seed"),
    ("sample-threshold", [*S, "--threshold", "bogus", "--out", "{o}"], "threshold"),
    ("sample-switch", [*S, "--switch", "x2y:5", "--student", "{w}/run/student", "--out", "{o}"], "--switch"),
    ("sample-student-truncated", [*S, "--student", "{w}/student_truncated", "--out", "{o}"], "model.safetensors"),
    ("sample-student-bad-json", [*S, "--student", "{w}/student_badjson", "--out", "{o}"], "ddil_mlp.json"),
    ("sample-student-bad-config", [*S, "--student", "{w}/student_badconfig", "--out", "{o}"], "student_badconfig"),
    ("sample-student-other-shape", [*S, "--student", "{w}/run_d8/student", "--out", "{o}"], "do not match"),
    ("sample-config-text-for-int", [*S, "--config", "{w}/steps_text.toml", "--out", "{o}"], "whole number"),
    ("sample-config-list-for-int", [*S, "--config", "{w}/steps_list.toml", "--out", "{o}"], "whole number"),
    ("sample-config-nan", [*S, "--config", "{w}/guidance_nan.yaml", "--out", "{o}"], "finite"),
    ("sample-config-yaml-syntax", [*S, "--config", "{w}/broken.yaml", "--out", "{o}"], "could not be parsed"),
    ("sample-config-toml-syntax", [*S, "--config", "{w}/broken.toml", "--out", "{o}"], "could not be parsed"),
    ("sample-config-unknown-key", [*S, "--config", "{w}/unknown_key.toml", "--out", "{o}"], "stepz"),
    ("sample-config-missing", [*S, "--config", "{w}/nope.toml", "--out", "{o}"], "not found"),
    ("sample-out-exists", [*S, "--out", "{w}/samples"], "--overwrite"),
    ("sample-out-is-file", [*S, "--out", "{w}/afile"], "is a file"),
    ("sample-prompts-empty", [*S, "--prompts", "{w}/empty.txt", "--out", "{o}"], "no prompts"),
    ("sample-prompts-binary", [*S, "--prompts", "{w}/binary.txt", "--out", "{o}"], "UTF-8"),
    ("sample-config-not-utf8", [*S, "--config", "{w}/latin1.toml", "--out", "{o}"], "UTF-8"),
    ("sample-device", [*S, "--device", "tpu", "--out", "{o}"], "--device"),
    ("sample-unknown-flag", [*S, "--stepz", "4", "--out", "{o}"], "--stepz"),
    # collect
    ("collect-rollouts-0", [*C, "--rollouts", "0", "--out", "{o}"], "--rollouts"),
    ("collect-teacher-prob", [*C, "--teacher-prob", "2", "--out", "{o}"], "--teacher-prob"),
    ("collect-shard-mb-0", [*C, "--shard-mb", "0", "--out", "{o}"], "--shard-mb"),
    ("collect-shard-mb-nan", [*C, "--shard-mb", "nan", "--out", "{o}"], "finite"),
    ("collect-max-samples-0", [*C, "--max-samples", "0", "--out", "{o}"], "--max-samples"),
    ("collect-guidance-nan", [*C, "--guidance", "nan", "--out", "{o}"], "finite"),
    ("collect-prior-sum", [*C, "--prior", "data=0.5,teacher=0.6", "--out", "{o}"], "prior"),
    ("collect-lab-with-data", [*C, "--data", "{w}/tiny.tar", "--out", "{o}"], "drop --data"),
    ("collect-out-not-a-buffer", [*C, "--out", "{w}/samples"], "buffer manifest"),
    ("collect-corrupt-buffer-manifest", [*C, "--out", "{w}/buffer_badmanifest"], "manifest.json"),
    ("collect-incompatible-buffer", [*C, "--steps", "4", "--teacher-steps", "8", "--out", "{w}/buffer"], "buffer"),
    ("collect-config-bool-for-int", [*C, "--config", "{w}/batch_bool.toml", "--out", "{o}"], "whole number"),
    ("collect-data-random-tar", ["collect", "--quiet", "--teacher", "embedded:digits", "--prior", "data=1",
                                 "--rollouts", "1", "--steps", "2", "--teacher-steps", "4", "--data",
                                 "{w}/random.tar", "--out", "{o}"], "random.tar"),
    ("collect-data-truncated-tar", ["collect", "--quiet", "--teacher", "embedded:digits", "--prior", "data=1",
                                    "--rollouts", "1", "--steps", "2", "--teacher-steps", "4", "--data",
                                    "{w}/truncated.tar", "--out", "{o}"], "truncated"),
    # distill
    ("distill-lr-nan-overwrite", [*D, "--lr", "nan", "--overwrite", "--out", "{w}/run"], "finite"),
    ("distill-lr-negative-overwrite", [*D, "--lr", "-1", "--overwrite", "--out", "{w}/run"], "--lr"),
    ("distill-steps-0", [*D, "--steps", "0", "--out", "{o}"], "--steps"),
    ("distill-batch-absurd", [*D, "--batch-size", "100000000", "--out", "{o}"], "--batch-size"),
    ("distill-mixed-precision", [*D, "--mixed-precision", "fp8", "--out", "{o}"], "fp16"),
    ("distill-collect-every-negative", [*D, "--collect-every", "-1", "--out", "{o}"], "got -1"),
    ("distill-ema-decay-1", [*D, "--ema-decay", "1", "--out", "{o}"], "--ema-decay"),
    ("distill-replay", [*D, "--replay", "lifo", "--out", "{o}"], "prioritised"),
    ("distill-tracker", [*D, "--tracker", "foo", "--out", "{o}"], "tensorboard"),
    ("distill-grad-norm-0", [*D, "--max-grad-norm", "0", "--out", "{o}"], "--max-grad-norm"),
    ("distill-student-prob", [*D, "--student-prob", "1.5", "--out", "{o}"], "--student-prob"),
    ("distill-prior", [*D, "--prior", "data=2", "--out", "{o}"], "prior"),
    ("distill-method", [*D, "--method", "xyz", "--out", "{o}"], "--method"),
    ("distill-guidance-range", [*D, "--guidance-range", "0,5", "--out", "{o}"], "--guidance-range"),
    ("distill-buffer-not-a-buffer", [*D, "--buffer", "{w}/samples", "--out", "{o}"], "samples"),
    ("distill-config-text-for-float", [*D, "--config", "{w}/lr_text.toml", "--out", "{o}"], "a number"),
    ("distill-exists-without-resume", [*D, "--out", "{w}/run"], "--resume latest"),
    ("distill-resume-corrupt-manifest", [*D, "--resume", "latest", "--out", "{w}/run_badmanifest"], "manifest.json"),
    ("distill-resume-truncated-checkpoint", [*D, "--resume", "{w}/run_truncated/" + CKPT, "--out",
                                             "{w}/run_truncated"], "student.safetensors"),
    ("distill-resume-other-shape", [*D, "--resume", "{w}/run_d8/" + CKPT, "--out", "{w}/run_unfinished"],
     "teacher='gmm:ring:8:d8'"),
    ("distill-resume-other-settings", [*D, "--teacher-steps", "16", "--resume", "latest", "--out", "{w}/run"],
     "teacher_steps"),
    ("distill-resume-not-a-checkpoint", [*D, "--resume", "{w}/samples", "--out", "{w}/run"], "state.json"),
    ("distill-resume-not-a-run", [*D, "--resume", "latest", "--out", "{w}/samples"], "not a ddil distill run"),
    # evaluate
    ("evaluate-no-samples", [*E, "--samples", "{w}/nope", "--reference", "gmm:ring:8", "--out", "{o}"], "samples"),
    ("evaluate-corrupt-states", [*E, "--samples", "{w}/samples_badnpy", "--reference", "gmm:ring:8", "--out", "{o}"],
     "states.npy"),
    ("evaluate-corrupt-jsonl", [*E, "--samples", "{w}/samples_badjsonl", "--reference", "gmm:ring:8", "--out",
                                "{o}"], "samples.jsonl"),
    ("evaluate-reference-random-tar", [*E, "--samples", "{w}/images", "--reference", "{w}/random.tar", "--out",
                                       "{o}"], "random.tar"),
    ("evaluate-reference-truncated-tar", [*E, "--samples", "{w}/images", "--reference", "{w}/truncated.tar",
                                          "--out", "{o}"], "truncated.tar"),
    ("evaluate-states-vs-images", [*E, "--samples", "{w}/samples", "--reference", "{w}/tiny.tar", "--out", "{o}"],
     "lab states"),
    ("evaluate-images-vs-gmm", [*E, "--samples", "{w}/images", "--reference", "gmm:ring:8", "--out", "{o}"],
     "images"),
    ("evaluate-metric", [*E, "--samples", "{w}/samples", "--reference", "gmm:ring:8", "--metrics", "nope",
                         "--out", "{o}"], "nope"),
    ("evaluate-eval-res-0", [*E, "--samples", "{w}/samples", "--eval-res", "0", "--out", "{o}"], "--eval-res"),
    ("evaluate-nearest-k-0", [*E, "--samples", "{w}/samples", "--nearest-k", "0", "--out", "{o}"], "--nearest-k"),
    ("evaluate-compare-corrupt", [*E, "--samples", "{w}/samples", "--reference", "gmm:ring:8", "--compare",
                                  "{w}/bad_metrics.json", "--out", "{o}"], "bad_metrics.json"),
    ("evaluate-stats-corrupt", [*E, "--samples", "{w}/images", "--reference", "{w}/bad_stats.npz", "--out", "{o}"],
     "bad_stats.npz"),
    ("evaluate-out-exists", [*E, "--samples", "{w}/samples", "--reference", "gmm:ring:8", "--out", "{w}/run"],
     "--overwrite"),
    # covariate-shift
    ("shift-betas", [*H, "--student", "{w}/run/student", "--betas", "1.5", "--out", "{o}"], "1.5"),
    ("shift-shift-samples-1", [*H, "--student", "{w}/run/student", "--shift-samples", "1", "--out", "{o}"],
     "--shift-samples"),
    ("shift-guidance-nan", [*H, "--student", "{w}/run/student", "--guidance", "nan", "--out", "{o}"], "finite"),
    ("shift-shift-reference", [*H, "--student", "{w}/run/student", "--shift-reference", "x", "--out", "{o}"],
     "--shift-reference"),
    ("shift-student-truncated", [*H, "--student", "{w}/student_truncated", "--out", "{o}"], "model.safetensors"),
    ("shift-out-foreign", [*H, "--student", "{w}/run/student", "--out", "{w}/samples"], "covariate-shift"),
    ("shift-config-bools", [*H, "--student", "{w}/run/student", "--config", "{w}/betas_bools.toml", "--out", "{o}"],
     "betas"),
    ("shift-no-student", [*H, "--out", "{o}"], "--student"),
    # teacher
    ("teacher-no-data", [*T, "--data", "{w}/nope", "--out", "{o}"], "nope"),
    ("teacher-lr-nan", [*T, "--data", "{w}/tiny.tar", "--lr", "nan", "--out", "{o}"], "finite"),
    ("teacher-channels", [*T, "--data", "{w}/tiny.tar", "--channels", "2", "--out", "{o}"], "--channels"),
    ("teacher-resolution-0", [*T, "--data", "{w}/tiny.tar", "--resolution", "0", "--out", "{o}"], "--resolution"),
    ("teacher-caption-dropout", [*T, "--data", "{w}/tiny.tar", "--caption-dropout", "1", "--out", "{o}"],
     "--caption-dropout"),
    ("teacher-threads-0", [*T, "--data", "{w}/tiny.tar", "--threads", "0", "--out", "{o}"], "--threads"),
    ("teacher-block-channels", [*T, "--data", "{w}/tiny.tar", "--block-channels", "0,5", "--out", "{o}"],
     "block channels"),
    ("teacher-resume-from-not-a-checkpoint", [*T, "--data", "{w}/tiny.tar", "--resume-from", "{w}/samples",
                                              "--out", "{o}"], "--resume-from"),
    ("teacher-data-random-tar", [*T, "--data", "{w}/random.tar", "--out", "{o}"], "random.tar"),
    ("teacher-out-exists", [*T, "--data", "{w}/tiny.tar", "--out", "{w}/samples"], "--overwrite"),
    # ---- second round (issue 24) ----
    # an output never overlaps an input, with or without --overwrite
    ("sample-out-is-student", [*S, "--student", "{w}/run/student", "--overwrite", "--out", "{w}/run/student"],
     "is the input --student"),
    ("sample-out-holds-student", [*S, "--student", "{w}/run/student", "--overwrite", "--out", "{w}/run"],
     "holds the input --student"),
    ("sample-out-inside-student", [*S, "--student", "{w}/run/student", "--out", "{w}/run/student/s"],
     "lies inside the input --student"),
    ("sample-out-holds-config", [*S, "--config", "{w}/cfgdir/ok.toml", "--overwrite", "--out", "{w}/cfgdir"],
     "holds the input --config"),
    ("evaluate-out-is-samples", [*E, "--samples", "{w}/samples", "--reference", "gmm:ring:8", "--overwrite",
                                 "--out", "{w}/samples"], "is the input --samples"),
    ("evaluate-out-symlink-to-samples", [*E, "--samples", "{w}/samples", "--reference", "gmm:ring:8",
                                         "--overwrite", "--out", "{w}/link_to_samples"], "is the input --samples"),
    ("evaluate-out-holds-compare", [*E, "--samples", "{w}/images", "--reference", "gmm:ring:8", "--compare",
                                    "{w}/samples", "--overwrite", "--out", "{w}/samples"], "--compare"),
    ("teacher-out-is-data", [*T, "--data", "{w}/shards", "--overwrite", "--out", "{w}/shards"],
     "is the input --data"),
    ("teacher-out-inside-data-pattern", [*T, "--data", "{w}/shards/*.tar", "--out", "{w}/shards/t"],
     "lies inside the input --data"),
    ("distill-out-holds-teacher", [*D, "--teacher", "{w}/run/student", "--overwrite", "--out", "{w}/run"],
     "holds the input --teacher"),
    ("distill-buffer-inside-run", [*D, "--prior", "data=0.5,student=0.5", "--buffer", "{w}/run/buffer/pd-4",
                                   "--overwrite", "--out", "{w}/run"], "holds the input --buffer"),
    ("collect-out-is-student", [*C, "--student", "{w}/run/student", "--prior", "student=1", "--teacher-prob", "0",
                                "--out", "{w}/run/student"], "is the input --student"),
    ("shift-out-holds-student", [*H, "--student", "{w}/run/student", "--out", "{w}/run"],
     "holds the input --student"),
    ("sample-out-root", [*S, "--overwrite", "--out", "/"], "names no folder"),
    ("sample-out-holds-the-current-folder", [*S, "--overwrite", "--out", ".."], "current folder"),
    # one writer per output
    ("sample-out-held", [*S, "--out", "{w}/held"], "pid 4242"),
    ("evaluate-out-held", [*E, "--samples", "{w}/samples", "--reference", "gmm:ring:8", "--out", "{w}/held"],
     "being written by another ddil run"),
    ("teacher-out-held", [*T, "--data", "{w}/tiny.tar", "--out", "{w}/held"], "being written by another ddil run"),
    ("distill-out-held", [*D, "--out", "{w}/held"], "being written by another ddil run"),
    ("shift-out-held", [*H, "--student", "{w}/run/student", "--out", "{w}/held"], "being written by another ddil run"),
    # numbers: upper bounds, inf and nan, sorted schedules
    ("sample-threads-huge", [*S, "--threads", "99999999999999999999", "--out", "{o}"], "--threads"),
    ("collect-threads-huge", [*C, "--threads", "99999999999999999999", "--out", "{o}"], "--threads"),
    ("sample-guidance-huge", [*S, "--guidance", "1e308", "--out", "{o}"], "--guidance"),
    ("distill-weight-decay-huge", [*D, "--weight-decay", "1e308", "--out", "{o}"], "--weight-decay"),
    ("distill-critic-lr-huge", [*D, "--method", "dmd2", "--critic-lr", "1e308", "--out", "{o}"], "--critic-lr"),
    ("distill-real-guidance-huge", [*D, "--method", "dmd2", "--real-guidance", "1e6", "--out", "{o}"],
     "--real-guidance"),
    ("distill-timestep-scaling-huge", [*D, "--method", "lcm", "--timestep-scaling", "1e308", "--out", "{o}"],
     "--timestep-scaling"),
    ("distill-w-max-huge", [*D, "--method", "lcm", "--w-max", "1e308", "--out", "{o}"], "--w-max"),
    ("distill-huber-c-inf", [*D, "--method", "lcm", "--huber-c", "inf", "--out", "{o}"], "finite"),
    ("distill-guidance-range-inf-overwrite", [*D, "--guidance-range", "1,inf", "--overwrite", "--out", "{w}/run"],
     "--guidance-range"),
    ("distill-guidance-range-nan", [*D, "--guidance-range", "nan,2", "--out", "{o}"], "--guidance-range"),
    ("distill-priority-alpha-huge-overwrite", [*D, "--replay", "prioritised", "--priority-alpha", "1e308",
                                               "--overwrite", "--out", "{w}/run"], "--priority-alpha"),
    ("distill-max-grad-norm-inf", [*D, "--max-grad-norm", "inf", "--out", "{o}"], "finite"),
    ("distill-stage-updates-huge", [*D, "--stage-updates", "99999999999999999999", "--out", "{o}"],
     "--stage-updates"),
    ("distill-prior-schedule-unsorted", [*D, "--prior-schedule", "0:data=1;0.6:data=0.5,student=0.5;0.2:data=1",
                                         "--out", "{o}"], "increasing"),
    ("distill-student-prob-unsorted", [*D, "--student-prob", "0:0.5;0.8:0.6;0.4:0.7", "--out", "{o}"],
     "increasing"),
    ("teacher-weight-decay-huge", [*T, "--data", "{w}/tiny.tar", "--weight-decay", "1e308", "--out", "{o}"],
     "--weight-decay"),
    # method flags and resumes that do not belong
    ("distill-dmd2-stage-updates", [*D, "--method", "dmd2", "--stage-updates", "5", "--out", "{o}"],
     "--stage-updates"),
    ("distill-dmd2-guided-updates", [*D, "--method", "dmd2", "--guided-updates", "5", "--out", "{o}"],
     "--guided-updates"),
    ("distill-lcm-stage-updates", [*D, "--method", "lcm", "--stage-updates", "5", "--out", "{o}"],
     "--stage-updates"),
    ("distill-resume-unknown-phase", [*D, "--resume", "latest", "--out", "{w}/run_foreignphase"], "dmd2-4"),
    ("distill-resume-other-method", [*D, "--method", "dmd2", "--resume", "latest", "--out", "{w}/run"], "method"),
    ("distill-resume-past-max-updates", [*D, "--max-updates", "5", "--resume", "latest", "--out",
                                         "{w}/run_unfinished"], "--max-updates"),
    ("distill-prompt-not-a-class-overwrite", [*D, "--prompts", "{w}/class99.txt", "--overwrite", "--out",
                                              "{w}/run"], "class 99"),
    ("distill-prompt-not-a-class-new", [*D, "--prompts", "{w}/class99.txt", "--out", "{o}"], "class 99"),
    ("sample-student-of-another-teacher", [*S, "--teacher", "gmm:ring:4", "--student", "{w}/run/student",
                                           "--out", "{o}"], "distilled from"),
    ("collect-student-of-another-teacher", [*C, "--teacher", "gmm:ring:4", "--student", "{w}/run/student",
                                            "--prior", "student=1", "--teacher-prob", "0", "--out", "{o}"],
     "distilled from"),
    # our own files, checked for content
    ("sample-student-no-weights", [*S, "--student", "{w}/student_noweights", "--out", "{o}"],
     "model.safetensors is missing"),
    ("sample-student-bad-prediction", [*S, "--student", "{w}/student_badpred", "--out", "{o}"], "prediction type"),
    ("sample-student-10-step-scheduler", [*S, "--student", "{w}/student_10step", "--out", "{o}"], "timesteps"),
    ("sample-student-nan-weight", [*S, "--student", "{w}/student_nan", "--out", "{o}"], "NaN"),
    ("shift-student-nan-weight", [*H, "--student", "{w}/student_nan", "--out", "{o}"], "NaN"),
    ("sample-teacher-unknown-beta-schedule", [*S, "--teacher", "{w}/teacher_badbeta", "--out", "{o}"],
     "teacher_badbeta"),
    ("sample-teacher-defaults-text", [*S, "--teacher", "{w}/teacher_defaults_text", "--out", "{o}"],
     "ddil_defaults.json"),
    ("sample-teacher-defaults-nan", [*S, "--teacher", "{w}/teacher_defaults_nan", "--out", "{o}"],
     "ddil_defaults.json"),
    ("distill-buffer-no-header", [*D, "--prior", "data=0.5,student=0.5", "--buffer", "{w}/buffer_noheader",
                                  "--out", "{o}"], "no header"),
    ("distill-buffer-shards-text", [*D, "--prior", "data=0.5,student=0.5", "--buffer", "{w}/buffer_shards_text",
                                    "--out", "{o}"], "shards"),
    ("collect-buffer-no-header", [*C, "--out", "{w}/buffer_noheader"], "no header"),
    ("evaluate-row-text", [*E, "--samples", "{w}/samples_rowtext", "--reference", "gmm:ring:8", "--out", "{o}"],
     "row"),
    ("evaluate-row-negative", [*E, "--samples", "{w}/samples_rowneg", "--reference", "gmm:ring:8", "--out", "{o}"],
     "row must be a whole number >= 0"),
    ("evaluate-bare-nan-in-jsonl", [*E, "--samples", "{w}/samples_barenan", "--reference", "gmm:ring:8", "--out",
                                    "{o}"], "NaN is not JSON"),
    ("evaluate-nan-states", [*E, "--samples", "{w}/samples_nan", "--reference", "gmm:ring:8", "--out", "{o}"],
     "NaN"),
    ("evaluate-stats-bad-shape", [*E, "--samples", "{w}/images", "--reference", "{w}/stats_badshape.npz",
                                  "--out", "{o}"], "sigma"),
    ("evaluate-stats-nan", [*E, "--samples", "{w}/images", "--reference", "{w}/stats_nan.npz", "--out", "{o}"],
     "NaN"),
    ("evaluate-stats-bad-meta", [*E, "--samples", "{w}/images", "--reference", "{w}/stats_badmeta.npz",
                                 "--out", "{o}"], "meta"),
    # config details
    ("evaluate-compare-metrics-not-a-table", [*E, "--samples", "{w}/samples", "--reference", "gmm:ring:8",
                                             "--compare", "{w}/metrics_list.json", "--out", "{o}"], "metrics_list.json"),
    ("evaluate-compare-bare-nan", [*E, "--samples", "{w}/samples", "--reference", "gmm:ring:8", "--compare",
                                   "{w}/metrics_nan.json", "--out", "{o}"], "NaN is not JSON"),
    ("distill-config-options-text", [*D, "--config", "{w}/options_text.toml", "--out", "{o}"], "table"),
    ("sample-config-yaml-duplicate-key", [*S, "--config", "{w}/dup.yaml", "--out", "{o}"], "twice"),
    ("sample-config-is-a-folder", [*S, "--config", "{w}/cfgdir", "--out", "{o}"], "is a folder"),
    ("sample-prompts-is-a-folder", [*S, "--prompts", "{w}/cfgdir", "--out", "{o}"], "is a folder"),
    ("distill-prompts-is-a-folder", [*D, "--prompts", "{w}/cfgdir", "--out", "{o}"], "is a folder"),
    # the fresh probe (reports/2026-12-07-reliability-probe.md): what it found broken, and its neighbours
    ("distill-out-is-a-file", [*D, "--out", "{w}/afile"], "not a writable folder"),
    ("sample-out-dangling-link", [*S, "--teacher", "gmm:ring:8", "--out", "{w}/dangling"], "does not exist"),
    ("distill-out-dangling-link", [*D, "--out", "{w}/dangling"], "does not exist"),
    ("evaluate-out-dangling-link", [*E, "--samples", "{w}/samples", "--reference", "gmm:ring:8",
                                    "--out", "{w}/dangling"], "does not exist"),
    ("sample-prompts-not-a-regular-file", [*S, "--teacher", "gmm:ring:8", "--prompts", "/dev/null", "--out", "{o}"],
     "is not a regular file"),
    ("distill-buffer-of-another-teacher", [*D, "--teacher", "gmm:ring:4", "--prior", "data=0.5,student=0.5",
                                           "--buffer", "{w}/buffer", "--out", "{o}"], "was collected with teacher"),
    ("collect-beside-a-sample-writing", [*C, "--teacher", "gmm:ring:8", "--out", "{w}/held"],
     "being written by another ddil run"),
]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (hidden ones too) by relative path -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_matrix_covers_every_command():
    commands = {argv[0] for _, argv, _ in CASES}
    assert commands == {"sample", "collect", "distill", "evaluate", "covariate-shift", "teacher"}
    assert len(CASES) >= 160 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    argv = [a.replace("{w}", str(world)).replace("{o}", str(out)) for a in argv]
    before = snapshot(world)
    capsys.readouterr()
    code, err = run_cli(argv, capsys)
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and ":ring:" not in err.replace("gmm:ring:", "")
    assert words.replace("{w}", str(world)) in lines[0], lines[0]
    assert snapshot(world) == before
    assert not out.exists() and not list(tmp_path.glob(".out*")), "a failed command left output behind"


def test_the_printed_line_is_literal(world, tmp_path, capsys):
    """Rich markup and emoji codes in what the user typed come back exactly as typed."""
    odd = "/nonexistent/[bold]x[/]:ring:/[/x]"
    code, err = run_cli(["sample", "--quiet", "--teacher", odd, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and odd in err and "💍" not in err


def test_teacher_never_suggests_a_flag_it_lacks(world, tmp_path, capsys):
    code, err = run_cli([*T, "--data", str(world / "tiny.tar"), "--resume-from", str(world / "samples"),
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--resume latest" not in err


# ---- recovery that succeeds ---------------------------------------------------------------------
def test_resume_latest_skips_a_damaged_newest_checkpoint(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world / "run_unfinished", run)
    (run / CKPT / "state.json").write_text("garbage")
    with pytest.warns(UserWarning, match="checkpoint-00000010"):
        code, err = run_cli(["distill", *LAB_RUN, "--resume", "latest", "--out", str(run)], capsys)
    assert code == 0, err
    reference = world / "run/student/model.safetensors"  # 5 -> 10 replays the same updates
    assert (run / "student/model.safetensors").read_bytes() == reference.read_bytes()


def test_damaged_buffer_shard_is_skipped_and_counted_in_training(world, tmp_path):
    from ddil_cli.buffer import BufferReader

    buffer = tmp_path / "buffer"
    shutil.copytree(world / "buffer", buffer)
    shards = sorted(buffer.glob("shard-*.tar"))
    shards[0].write_bytes(shards[0].read_bytes()[:1000])
    reader = BufferReader(str(buffer), shuffle=0, split_by_node=False, split_by_worker=False)
    with pytest.warns(UserWarning, match="damaged"):
        samples = list(reader)
    assert reader.stats.corrupt_shards == 1 and samples


def test_shard_metadata_of_the_wrong_shape_is_damage_not_a_traceback(world, tmp_path):
    """meta.json that parses but is not a list of states: the reader skips the shard as damaged,
    and a writer adopting such an orphan shard leaves it out with a warning."""
    import tarfile

    from ddil_cli.buffer import BufferReader
    from ddil_cli.buffer.writer import META_KEY, shard_counts

    buffer = tmp_path / "buffer"
    shutil.copytree(world / "buffer", buffer)
    shard = sorted(buffer.glob("shard-*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = b'[{"no": "source"}]' if member.name.endswith(META_KEY) else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match="source"):
        shard_counts(buffer, shard.name)
    reader = BufferReader(str(buffer), shuffle=0, split_by_node=False, split_by_worker=False)
    with pytest.warns(UserWarning, match="damaged"):
        list(reader)
    assert reader.stats.corrupt_shards == 1


def test_a_metric_that_comes_out_nan_is_unavailable_not_null():
    from ddil_cli.evaluate import metrics as M

    nan = M.Metric("nan-probe", lambda ctx, needs: {"value": float("nan"), "n": 3}, "lab")
    fine = M.Metric("fine-probe", lambda ctx, needs: {"value": 0.5}, "lab")
    assert M.run_metric(None, fine) == {"available": True, "value": 0.5}
    result = M.run_metric(None, nan)
    assert result["available"] is False and "value" in result["reason"] and "NaN" in result["reason"]


def test_outputs_follow_the_umask(tmp_path, capsys):
    old = os.umask(0o002)
    try:
        code, err = run_cli(["sample", "--quiet", "--teacher-steps", "8", "--num-per-prompt", "1",
                             "--out", str(tmp_path / "s")], capsys)
        code2, err2 = run_cli(["collect", *C[1:], "--cache-prompts", "--out", str(tmp_path / "b")], capsys)
    finally:
        os.umask(old)
    assert code == 0 and code2 == 0, err + err2
    for path in [tmp_path / "s", *(tmp_path / "s").iterdir(), tmp_path / "b",
                 *(p for p in (tmp_path / "b").rglob("*") if p.name != ".lock")]:
        expected = 0o775 if path.is_dir() else 0o664
        assert path.stat().st_mode & 0o777 == expected, path


def test_json_written_is_strict(world):
    for path in world.rglob("*.json"):
        if "bad" in path.parent.name or path.name == "bad_metrics.json" or "badmanifest" in str(path) \
                or path.parent.name == "teacher_defaults_nan" or path.name.startswith("metrics_"):  # broken on purpose
            continue
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


# ---- a full disk --------------------------------------------------------------------------------
def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "somefile")


@pytest.mark.parametrize("command", ["sample", "collect"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(os, "fsync", _no_space)  # the first flush of a published file fails
    out = tmp_path / "out"
    argv = ([*S, "--num-per-prompt", "1"] if command == "sample" else C) + ["--out", str(out)]
    code, err = run_cli(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "disk is full" in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_real_full_disk_keeps_old_content_and_no_partial_files(world, tmp_path, capsys):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "1m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        shutil.copytree(world / "buffer", disk / "buffer")
        shards = snapshot(disk / "buffer")
        (disk / "filler").write_bytes(b"\0" * 700_000)
        for argv in ([*S, "--num-per-prompt", "4000", "--out", str(disk / "s")],
                     [*C, "--rollouts", "4000", "--shard-samples", "100000", "--out", str(disk / "buffer")]):
            code, err = run_cli(argv, capsys)
            assert code == 2 and len(err.splitlines()) == 1 and "disk is full" in err, err
            assert ("--resume" in err) == (argv[0] == "sample"), err
        # the samples written before the disk filled are kept (whole files only) for --resume
        assert not (disk / "s").exists() and [p.name for p in disk.glob(".s.*")] == [".s.sampling"]
        assert not [p for p in (disk / ".s.sampling").rglob(".*")]
        after = snapshot(disk / "buffer")
        assert {k: v for k, v in after.items() if k.startswith("shard-")} == \
            {k: v for k, v in shards.items() if k.startswith("shard-")}
        assert not list((disk / "buffer").glob(".*.partial*"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ---- SIGKILL at random points -------------------------------------------------------------------
def _crash_module():
    spec = importlib.util.spec_from_file_location("ddil_bench_crash", ROOT / "bench" / "crash.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sigkill_at_random_points_resumes_to_the_uninterrupted_result(tmp_path):
    crash = _crash_module()
    rng = random.Random(14)
    reference = crash.distill_reference(tmp_path)
    rows = [crash.distill_trial(tmp_path, round(rng.uniform(0.2, 1.6), 3), reference) for _ in range(2)]
    reference = crash.collect_reference(tmp_path)
    rows.append(crash.collect_trial(tmp_path, round(rng.uniform(0.0, 0.6), 3), reference))
    assert all(r["equal"] for r in rows), rows
    assert sum(r["killed"] for r in rows) >= 2, rows  # the kills landed mid-run


def test_a_tilde_the_shell_left_alone_means_home(tmp_path, capsys, monkeypatch):
    """`--out=~/s` and quoted paths reach ddil with the ~ unexpanded: it was a folder named "~"
    in the current folder; now it is the home folder, as the shell would have made it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["sample", "--quiet", "--teacher", "gmm:ring:8", "--teacher-steps", "8", "--num-per-prompt",
                         "2", "--out=~/s"], capsys)
    assert code == 0, err
    assert (tmp_path / "home/s/samples.jsonl").is_file() and not (tmp_path / "~").exists()
