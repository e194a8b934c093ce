"""`ddil covariate-shift`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ddil_cli.atomic import kept_if_interrupted, output_lock
from ddil_cli.cli.common import (HELP_CONFIG, HELP_DEVICE, HELP_QUIET, HELP_SEED, check_out_apart, console, progress,
                                 resolve_config, resolve_device)
from ddil_cli.evaluate.run import ALL_METRICS
from ddil_cli.models import MODEL_HELP
from ddil_cli.stages.shift import ShiftConfig, resolve_inputs, run_shift
from ddil_cli.validate import BATCH, GUIDANCE, SEED, STEPS, Rule

D = ShiftConfig()

# what each option must satisfy beyond its type (validate.py), checked before anything is written
RULES = {"steps": STEPS, "teacher_steps": STEPS, "shift_reference": Rule(choices=("auto", "data", "teacher")),
         "shift_samples": Rule(low=2, high=10**7), "shift_dims": Rule(low=1, high=65536), "guidance": GUIDANCE,
         "num_per_prompt": Rule(low=1, high=2**20), "batch_size": BATCH, "seed": SEED,
         "betas": Rule(comma_list=True), "switch_at": Rule(comma_list=True), "metrics": Rule(comma_list=True)}

SHIFT_HELP = f"""Measure a few-step student's covariate shift: the paper's mixed rollouts, and directly.

1. Mixed rollouts (the paper's Table 9) on the student's grid: the teacher takes each transition
with probability beta (--betas; beta 1, the teacher alone, is always the reference row), or the
teacher drives until t* and the student after (t2s), or the reverse (s2t), for each --switch-at
t*. Same prompts and seeds everywhere; each setting is scored by `ddil evaluate` (--metrics,
--reference, --features; lab default: the exact mixture metrics against the teacher's spec).

2. Direct measure, per student timestep: Frechet distance between the states the student visits
and the forward-diffused data marginal (--shift-reference teacher: states on the teacher's own
trajectories), and the teacher-target error on each set, for --student and every
--compare-student, overlaid in plots/direct.png.

Output (--out, resumable: finished settings are reused when their configuration hash matches):
settings/NAME/ (samples, metrics.json), direct/LABEL/, table.md, table.csv, direct.csv,
plots/beta.png, plots/switch.png, plots/direct.png. Models: {MODEL_HELP}. Metrics: {', '.join(ALL_METRICS)}.

Examples:

  ddil covariate-shift --teacher gmm:ring:8 --student runs/pd/student --compare-student runs/ddil/student --out shift/lab

  ddil covariate-shift --teacher gmm:ring:8 --student runs/pd/student --settings 'beta-*' --betas 0.5,0 --out s/

  ddil covariate-shift --teacher embedded:digits --student runs/digits-pd/student --features embedded:digits --metrics fid,clip --reference data/digits/heldout-000000.tar --data 'data/digits/train-{{000000..000001}}.tar' --out shift/digits
"""


def covariate_shift_command(
    ctx: typer.Context,
    teacher: str = typer.Option(D.teacher, help=f"Teacher: {MODEL_HELP}."),
    student: Optional[str] = typer.Option(None, help="Student folder to analyse (a `ddil distill` output's student/)."),
    student_label: Optional[str] = typer.Option(None, help="Its label in tables and plots (default: the run folder's name)."),
    compare_student: Optional[list[str]] = typer.Option(None, help="Another student for the direct measure, "
                                                        "LABEL=DIR or DIR (repeatable); overlaid in the plot."),
    steps: int = typer.Option(D.steps, help="Student steps (its grid must nest in the teacher's)."),
    teacher_steps: int = typer.Option(D.teacher_steps, help="Teacher DDIM steps."),
    betas: str = typer.Option(D.betas, help="Teacher probabilities, comma-separated (beta 1 is always added)."),
    switch_at: str = typer.Option(D.switch_at, help="Switch timesteps t* for t2s and s2t, comma-separated."),
    settings: Optional[list[str]] = typer.Option(None, help="Compute only these settings (names or globs, e.g. "
                                                 "'beta-*', 't2s-500', 'direct-*'; comma-separated or repeated)."),
    metrics: Optional[str] = typer.Option(None, help="Comma-separated `ddil evaluate` metrics (default: all the "
                                          "reference supports)."),
    reference: Optional[str] = typer.Option(None, help="`ddil evaluate --reference` (default for the lab: the "
                                            "teacher's gmm spec)."),
    features: Optional[str] = typer.Option(None, help="`ddil evaluate --features`, e.g. embedded:digits."),
    data: Optional[str] = typer.Option(None, help="Image-caption shards whose forward diffusion is the direct "
                                       "measure's reference (the lab uses its exact mixture)."),
    shift_reference: str = typer.Option(D.shift_reference, help="Direct measure reference: auto (data when there "
                                        "is data, else teacher), data, or teacher (states on teacher trajectories)."),
    shift_samples: int = typer.Option(D.shift_samples, help="States per set for the direct measure."),
    shift_dims: int = typer.Option(D.shift_dims, help="Larger states are average-pooled (or projected) to at most "
                                   "this many numbers before the Frechet distance."),
    guidance: Optional[float] = typer.Option(None, help="CFG scale w (1 = conditional only); default: the "
                                                   "w the student was distilled at, else the teacher's."),
    prompt: Optional[list[str]] = typer.Option(None, help="A prompt (repeatable). Lab prompts: 'class 0', ..."),
    prompts: Optional[Path] = typer.Option(None, help="Text file, one prompt per line."),
    num_per_prompt: int = typer.Option(D.num_per_prompt, help="Samples per prompt in each setting."),
    batch_size: int = typer.Option(D.batch_size, help="States per forward batch."),
    threshold: str = typer.Option(D.threshold, help="none, static:C or dynamic:P on every x0 estimate."),
    seed: int = typer.Option(D.seed, help=HELP_SEED),
    device: str = typer.Option("auto", help=HELP_DEVICE),
    out: Path = typer.Option(Path(D.out), help="Output folder (reused: finished settings are kept)."),
    quiet: bool = typer.Option(False, help=HELP_QUIET),
    config: Optional[Path] = typer.Option(None, help=HELP_CONFIG),
):
    cfg = resolve_config(ctx, ShiftConfig, config, RULES)
    cfg.device = resolve_device(cfg.device)
    cfg.prompt, cfg.compare_student, cfg.settings = cfg.prompt or [], cfg.compare_student or [], cfg.settings or []
    check_out_apart(cfg.out, {"--teacher": cfg.teacher, "--student": cfg.student,
                              "--compare-student": cfg.compare_student, "--reference": cfg.reference,
                              "--data": cfg.data, "--prompts": cfg.prompts, "--config": config})
    inputs = resolve_inputs(cfg)  # load and validate everything before anything is written
    kept = f"the settings finished so far in {cfg.out} (run the command again: it reuses them)"
    with output_lock(cfg.out, "ddil covariate-shift"), kept_if_interrupted(kept), progress(cfg.quiet) as bar:
        summary = run_shift(cfg, progress=bar, inputs=inputs)
    if not cfg.quiet:
        from rich.markdown import Markdown

        console.print(Markdown((Path(cfg.out) / "table.md").read_text()))
        console.print(f"[green]wrote[/] {escape(str(cfg.out))}/table.md, table.csv, direct.csv and "
                      f"{', '.join(summary['plots']) or 'no plots'} ({len(summary['computed'])} computed, "
                      f"{len(summary['reused'])} reused, {summary['seconds']:.1f} s)")


covariate_shift_command.__doc__ = SHIFT_HELP
