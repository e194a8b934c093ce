"""A seed from `ddil sample` reruns in plain diffusers: each method's student (PD: DDIM, LCM and
DMD2: LCMScheduler) in the pipeline a user would pick, with the prompt, guidance and seed that
samples.jsonl recorded and `generator=torch.Generator().manual_seed(seed)`, nothing injected,
gives `ddil sample`'s pixels; and the saved scheduler loads without a deprecation warning."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ddil_cli.stages.distill import DistillConfig, run_distill
from cli_runner import run_cli as cli

TINY = dict(steps=4, teacher_steps=8, batch_size=2, collect_every=2, rollouts_per_collect=2, quiet=True)
# the method, its run options, and the pipeline class a user loads its student with
METHODS = {
    "pd": (dict(options={"stage_updates": "1"}, guidance=2.0), "StableDiffusionPipeline"),
    "lcm": (dict(max_updates=1, options={"unroll_steps": "4"}), "LatentConsistencyModelPipeline"),
    "dmd2": (dict(max_updates=1, options={"critic_updates": 1, "real_guidance": 3.0}), "StableDiffusionPipeline"),
}


def _pipeline(name, folder):
    import diffusers

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = getattr(diffusers, name).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    deprecations = [str(w.message) for w in caught if "steps_offset" in str(w.message) or
                    issubclass(w.category, FutureWarning)]
    assert not deprecations, deprecations
    return pipe.set_progress_bar_config(disable=True) or pipe


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sample_seeds_rerun_in_plain_diffusers(tiny_sd_root, tmp_path, capsys, method):
    run_options, pipeline_class = METHODS[method]
    teacher, prompts = str(tiny_sd_root / "teacher"), str(tiny_sd_root / "prompts.txt")
    run_distill(DistillConfig(method=method, teacher=teacher, prompts=prompts,
                              prior="student=0.5,teacher=0.5", out=str(tmp_path / "run"), **TINY, **run_options))
    student = tmp_path / "run/student"
    # three samples in batches of two: a sample's seed alone decides it, not its batch or position
    code, err = cli(["sample", "--quiet", "--teacher", teacher, "--student", str(student),
                     "--steps", "4", "--prompt", "a cat", "--prompt", "a dog", "--num-per-prompt", "2",
                     "--batch-size", "3", "--seed", "7", "--out", str(tmp_path / "samples")], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in open(tmp_path / "samples/samples.jsonl")]
    pipe = _pipeline(pipeline_class, student)
    assert type(pipe.scheduler).__name__ == ("DDIMScheduler" if method == "pd" else "LCMScheduler")
    for row in rows[1:]:
        image = pipe(row["prompt"], num_inference_steps=row["steps"], guidance_scale=row["guidance"],
                     generator=torch.Generator().manual_seed(row["seed"]), output_type="np").images[0]
        ours = np.asarray(Image.open(tmp_path / "samples" / row["file"])).astype(int)
        assert np.abs(ours - np.round(image * 255).astype(int)).max() <= 1, (method, row)


def test_saved_schedulers_keep_their_grids_with_steps_offset_one(tmp_path):
    from diffusers import DDIMScheduler, LCMScheduler

    from ddil_cli.diffusion.schedule import trailing_timesteps
    from ddil_cli.models.diffusers_t2i import student_scheduler

    base = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "original_inference_steps": 50}
    for kind, grid in (("ddim", trailing_timesteps(4)), ("ddim", [999, 499]), ("lcm", [999, 759, 499, 259])):
        sched = student_scheduler(base, grid, "epsilon", kind)
        assert sched.config.steps_offset == 1
        sched.save_pretrained(tmp_path / kind)
        loaded = (DDIMScheduler if kind == "ddim" else LCMScheduler).from_pretrained(tmp_path / kind)
        loaded.set_timesteps(len(grid))
        assert loaded.timesteps.tolist() == grid
