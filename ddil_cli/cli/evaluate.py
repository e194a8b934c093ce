"""`ddil evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ddil_cli.cli.common import (HELP_CONFIG, HELP_DEVICE, HELP_OVERWRITE, HELP_QUIET, HELP_SEED, check_out_apart,
                                 console, default_workers, output_dir, progress, resolve_config, resolve_device)
from ddil_cli.evaluate.config import EvaluateConfig
from ddil_cli.evaluate.run import ALL_METRICS
from ddil_cli.stages.evaluate import run_evaluate
from ddil_cli.validate import BATCH, POSITIVE, SEED, Rule

D = EvaluateConfig()
# the files and folders evaluate reads: --out may be none of them, nor inside or around one
INPUTS = ("samples", "reference", "compare", "inception", "dinov2", "dinov2_repo", "clip", "lpips_backbone",
          "digits_classifier", "cache_dir")

# what each option must satisfy beyond its type (validate.py), checked before anything is written
RULES = {"eval_res": Rule(low=8, high=4096), "num_reference": POSITIVE, "prdc_max": Rule(low=2),
         "nearest_k": POSITIVE, "batch_size": BATCH, "seed": SEED, "workers": Rule(low=0, high=64)}

EVALUATE_HELP = f"""Score a `ddil sample` folder against a reference; writes metrics.json and prints a table.

Metrics: fid (clean-fid Inception), clip (OpenCLIP cosine, ~0.30), pr and dc (precision/recall,
density/coverage, k-NN in DINOv2 space), lpips-div (per-prompt LPIPS diversity); for a
Gaussian-mixture reference the exact lab metrics mode-coverage, quality, class-recall, swd.
Default: every metric the reference supports. All weights come from local files; a metric
whose weights are missing is reported unavailable with the flag that enables it (--strict:
an error). Protocol and how to get the weights offline: docs/evaluate.md. Choices: {', '.join(ALL_METRICS)}.

Examples:

  ddil evaluate --samples s/teacher --reference gmm:ring:8 --out eval/teacher

  ddil evaluate --samples s/student --reference coco5k/ --metrics fid,clip,pr,dc,lpips-div \\
      --inception ~/w/inception-2015-12-05.pt --dinov2 ~/w/dinov2_vitl14_pretrain.pth \\
      --clip ~/w/open_clip_pytorch_model.bin --out eval/student --compare eval/teacher

  ddil evaluate --samples s/digits --reference digits-ref/ --features embedded:digits --out eval/digits
"""


def evaluate_command(
    ctx: typer.Context,
    samples: Path = typer.Option(..., help="A `ddil sample` output folder (samples.jsonl)."),
    reference: Optional[str] = typer.Option(None, help="Image folder, webdataset .tar shards (file, folder or "
                                            "glob), a statistics .npz, or a Gaussian-mixture spec (gmm:ring:8)."),
    metrics: Optional[str] = typer.Option(None, help="Comma-separated metrics (default: all the reference supports)."),
    features: Optional[str] = typer.Option(None, help="Feature space for fid/pr/dc instead of Inception/DINOv2, "
                                           "e.g. embedded:digits (its prompt alignment then replaces clip)."),
    eval_res: int = typer.Option(D.eval_res, help="Square resolution both sides are center-cropped and "
                                 "LANCZOS-resized to before any extractor."),
    num_reference: Optional[int] = typer.Option(None, help="Use only the first N reference images (sorted)."),
    prdc_max: int = typer.Option(D.prdc_max, help="Random subsample size per side for pr/dc."),
    nearest_k: int = typer.Option(D.nearest_k, help="k of the k-NN radii for pr/dc."),
    inception: Optional[Path] = typer.Option(None, help="inception-2015-12-05.pt (file or its folder); default: "
                                             "clean-fid's cache /tmp/inception-2015-12-05.pt."),
    dinov2: Optional[Path] = typer.Option(None, help="dinov2_vitl14_pretrain.pth; default: "
                                          "$TORCH_HOME/hub/checkpoints/dinov2_vitl14_pretrain.pth."),
    dinov2_repo: Optional[Path] = typer.Option(None, help="Local facebookresearch/dinov2 clone: load through "
                                               "torch.hub instead of timm (same features)."),
    clip: Optional[Path] = typer.Option(None, help="OpenCLIP checkpoint for --clip-arch; default: the HF cache "
                                        "of laion/CLIP-ViT-g-14-laion2B-s12B-b42K."),
    clip_arch: str = typer.Option(D.clip_arch, help="OpenCLIP architecture."),
    lpips_backbone: Optional[Path] = typer.Option(None, help="torchvision alexnet-owt-7be5be79.pth; default: "
                                                  "$TORCH_HOME/hub/checkpoints/."),
    digits_classifier: Optional[Path] = typer.Option(None, help="Classifier for embedded:digits (default: shipped)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Reference statistics cache (default: $DDIL_CACHE or "
                                             "~/.cache/ddil, under evaluate/)."),
    no_cache: bool = typer.Option(False, help="Neither read nor write cached reference statistics."),
    compare: Optional[Path] = typer.Option(None, help="Another metrics.json (or its folder): print deltas."),
    strict: bool = typer.Option(False, help="Unavailable metrics are an error instead of a table row."),
    batch_size: int = typer.Option(D.batch_size, help="Images per extractor batch."),
    workers: Optional[int] = typer.Option(None, help="Image decoding processes (DataLoader workers); default 0 "
                                          "on 2 cores or fewer, else half the cores, at most 8."),
    seed: int = typer.Option(D.seed, help=HELP_SEED),
    device: str = typer.Option("auto", help=HELP_DEVICE),
    out: Path = typer.Option(Path(D.out), help="Output folder (metrics.json, manifest.json)."),
    quiet: bool = typer.Option(False, help=HELP_QUIET),
    overwrite: bool = typer.Option(False, help=HELP_OVERWRITE),
    config: Optional[Path] = typer.Option(None, help=HELP_CONFIG),
):
    from ddil_cli.evaluate import report
    from ddil_cli.manifest import write_manifest

    cfg = resolve_config(ctx, EvaluateConfig, config, RULES)
    cfg.device = resolve_device(cfg.device)
    check_out_apart(cfg.out, {f"--{name.replace('_', '-')}": getattr(cfg, name) for name in INPUTS} | {"--config": config})
    if cfg.workers is None:
        cfg.workers = default_workers()
    with output_dir(cfg.out, overwrite=cfg.overwrite, what="ddil evaluate") as work, progress(cfg.quiet) as bar:
        result = run_evaluate(cfg, work, progress=bar)
        write_manifest(work, "evaluate", cfg, inputs={"samples": cfg.samples, "compare": cfg.compare},
                       extra={"reference": result["reference"], "unavailable": result["unavailable"]})
    if not cfg.quiet:
        console.print(report.metrics_table(result))
        for note in result["notes"]:
            console.print(f"[yellow]note:[/] {escape(str(note))}", highlight=False)
        if "compare" in result:
            console.print(report.compare_table(result["compare"]["deltas"], result["compare"]["other"]))
        console.print(f"[green]wrote[/] {escape(str(Path(cfg.out) / 'metrics.json'))}")


evaluate_command.__doc__ = EVALUATE_HELP
