"""bench/fullsize_cpu.py at the tiny size: it builds the pipeline folder, distils through the CLI,
measures the run and loads the student in plain diffusers (LoRA too, once the CLI has it)."""

import importlib.util
import math
import sys
from pathlib import Path

from diffusers import StableDiffusionPipeline

_spec = importlib.util.spec_from_file_location("fullsize_cpu", Path(__file__).parents[1] / "bench" / "fullsize_cpu.py")
fullsize_cpu = importlib.util.module_from_spec(_spec)
sys.modules["fullsize_cpu"] = fullsize_cpu  # dataclasses look their module up there
_spec.loader.exec_module(fullsize_cpu)


def test_tiny_lcm_distils_and_loads_in_diffusers(tmp_path, capsys):
    results = fullsize_cpu.main(["--size", "tiny", "--resolution", "16", "--updates", "1", "--methods", "lcm",
                                 "--modes", "full,lora", "--lora-rank", "4", "--work", str(tmp_path / "work")])
    assert [r.mode for r in results] == (["full", "lora"] if fullsize_cpu.cli_has_lora() else ["full"])
    for r in results:
        assert r.exit_code == 0 and r.diffusers == "yes", r
        assert r.peak_rss_gb > 0.1 and math.isfinite(r.s_per_update) and r.checkpoint_gb > 0
    assert "| tiny | lcm | full |" in capsys.readouterr().out
    teacher = StableDiffusionPipeline.from_pretrained(tmp_path / "work/teacher")
    assert teacher.unet.config.sample_size * 2 == 16  # the tiny VAE halves: 16 px images, 8 px latents
