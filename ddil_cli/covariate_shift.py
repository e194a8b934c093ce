"""Covariate shift of a few-step student (docs/covariate-shift.md): the settings of the paper's
mixed-rollout analysis (its Table 9) and a direct, per-timestep measure of the shift.

Mixed-rollout settings, on the student's grid (4 steps: 999, 749, 499, 249):
- `beta-B`: each transition goes to the teacher with probability B (B = 1 is the teacher alone,
  always included as the reference row; B = 0 is the student alone);
- `t2s-T`: the teacher takes every transition that starts above timestep T, then the student;
- `s2t-T`: the reverse.
All settings use the same prompts and per-sample seeds, so they differ only in who drives.

Direct measure (ours), for each student timestep t_i:
- the states the student visits (its own rollouts from noise, every transition its own) against
  reference states with the marginal the student was trained for: forward-diffused data
  x_t = a_t x0 + s_t eps (exact mixture samples in the lab; `--data` images otherwise), or, with
  no data, states on the teacher's own trajectories at t_i (DDIL's data-free proxy for the data),
  started from the same noise as the student's (common random numbers: the sets coincide at
  t = 999, and a student equal to the teacher gives exactly 0);
- `fd`: Frechet distance between the two sets of (shift-feature) states; `fd_floor`: the same
  between the reference set and an independent second one (other data, or other seeds), the
  sampling-noise level of an FD between uncoupled sets of this size;
- teacher-target error: from a state at t_i, the mean squared difference between where the
  student's one DDIM step lands and where the teacher's T/S steps over the same interval land
  (this is the PD target measured in state space: the landing states differ by a per-timestep
  constant times the x0 error of PD's target). `err_own` on the student's states, `err_ref` on
  the reference states; their ratio is how much worse the student is where it actually goes.
The clean end (t = -1) gets `fd` only: the student's samples against clean data (or teacher samples).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddil_cli.errors import UserError
from ddil_cli.evaluate.frechet import frechet_distance_features
from ddil_cli.models.base import Denoiser
from ddil_cli.rollout import Grid, ddim_path, rollout_seeds

REFERENCE_KINDS = ("auto", "data", "teacher")


# ---- the settings of the mixed-rollout analysis ------------------------------------------------

@dataclass(frozen=True)
class Setting:
    kind: str  # beta | t2s | s2t
    value: float

    @property
    def name(self) -> str:
        return f"beta-{self.value:g}" if self.kind == "beta" else f"{self.kind}-{int(self.value)}"

    @property
    def teacher_prob(self) -> float | None:
        return self.value if self.kind == "beta" else None

    @property
    def switch(self) -> str | None:
        return None if self.kind == "beta" else f"{self.kind}:{int(self.value)}"

    def describe(self) -> str:
        if self.kind == "beta":
            return "teacher alone" if self.value == 1 else ("student alone" if self.value == 0 else
                                                            f"teacher takes a transition w.p. {self.value:g}")
        first, second = ("teacher", "student") if self.kind == "t2s" else ("student", "teacher")
        return f"{first} above t={int(self.value)}, then {second}"


def parse_number_list(text: str | list | None, flag: str, cast=float) -> list:
    """'0.8,0.6' (or a list from a config file) to numbers; an empty string gives []."""
    if text is None:
        return []
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        values = [float(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise UserError(f"bad {flag} {text!r}; give comma-separated numbers, e.g. {flag} 0.8,0.6") from None
    if cast is int and any(v != int(v) for v in values):
        raise UserError(f"{flag} takes whole timesteps, got {text!r}")
    return [cast(v) for v in values]


def build_settings(betas: list[float], switch_at: list[int], num_train_timesteps: int = 1000) -> list[Setting]:
    """The teacher reference (beta 1), the betas, then both switch directions at each t*."""
    for b in betas:
        if not 0 <= b <= 1:
            raise UserError(f"--betas value {b:g} is outside [0, 1]")
    for t in switch_at:
        if not 0 <= t < num_train_timesteps:
            raise UserError(f"--switch-at value {t} is not a timestep in [0, {num_train_timesteps - 1}]")
    # beta 1 (the teacher) is the row every other setting is read against
    values = list(dict.fromkeys([1.0] + [float(b) for b in betas]))
    settings = [Setting("beta", b) for b in values]
    for kind in ("t2s", "s2t"):
        settings += [Setting(kind, float(t)) for t in dict.fromkeys(switch_at)]
    return settings


def select(names: list[str], patterns: list[str] | None) -> list[str]:
    """The names matching any pattern (shell globs such as 'beta-*'); all when no pattern."""
    if not patterns:
        return list(names)
    if isinstance(patterns, str):  # a config file's `settings = "beta-*"`
        patterns = [patterns]
    patterns = [p.strip() for item in patterns for p in str(item).split(",") if p.strip()]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise UserError(f"--settings {', '.join(unmatched)} matches nothing; available: {', '.join(names)}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def config_key(parts: dict) -> str:
    """The hash that decides whether a stored result can be reused."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ---- the direct measure ------------------------------------------------------------------------

def shift_features(states: torch.Tensor, max_dims: int, seed: int = 0) -> np.ndarray:
    """Flattened states (float64), reduced to at most `max_dims` numbers per state.

    States with spatial axes (C, H, W) are average-pooled over space (a linear map, meaningful at
    every noise level, no weights); flat states are projected by a fixed seeded Gaussian matrix.
    """
    x = states.detach().float().cpu()
    flat = x.reshape(len(x), -1)
    if flat.shape[1] <= max_dims:
        return flat.double().numpy()
    if x.ndim == 4:
        channels = x.shape[1]
        side = math.isqrt(max(max_dims // channels, 1))
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, side)
        return pooled.reshape(len(x), -1)[:, :max_dims].double().numpy()
    gen = torch.Generator().manual_seed(seed)
    projection = torch.randn(flat.shape[1], max_dims, generator=gen, dtype=torch.float64) / math.sqrt(max_dims)
    return (flat.double() @ projection).numpy()


@dataclass
class StateSet:
    """States at each student timestep (index i: before transition i), their clean end, prompts."""

    states: list[torch.Tensor]
    final: torch.Tensor
    prompts: list[str]


def _batches(n: int, batch_size: int):
    for begin in range(0, n, batch_size):
        yield begin, min(begin + batch_size, n)


def _cat(parts: list[StateSet]) -> StateSet:
    return StateSet([torch.cat([p.states[i] for p in parts]) for i in range(len(parts[0].states))],
                    torch.cat([p.final for p in parts]), [q for p in parts for q in p.prompts])


def pure_rollout_states(model: Denoiser, teacher: Denoiser, grid: Grid, prompts: list[str], seeds: list[int], *,
                        as_teacher: bool, guidance: float, threshold, batch_size: int, device: str) -> StateSet:
    """States on pure rollouts of `model` (the teacher's own grid when `as_teacher`), from each seed's noise."""
    parts = []
    for begin, end in _batches(len(seeds), batch_size):
        batch_prompts = prompts[begin:end]
        result = rollout_seeds(seeds[begin:end], batch_prompts, grid, teacher=teacher,
                               student=None if as_teacher else model, teacher_prob=1.0 if as_teacher else 0.0,
                               guidance=guidance, threshold=threshold, record=True, device=device)
        parts.append(StateSet([s.cpu() for s in result.states], result.final.cpu(), batch_prompts))
    return _cat(parts)


def forward_diffused(data, teacher: Denoiser, grid: Grid, n: int, generator: torch.Generator,
                     batch_size: int) -> StateSet:
    """n clean data states (a `DataStates`) noised to every student timestep with fresh noise."""
    x0_parts, prompts = [], []
    for begin, end in _batches(n, batch_size):
        x0, batch_prompts = data.batch(end - begin, generator, begin)
        x0_parts.append(x0.float())
        prompts += batch_prompts
    x0 = torch.cat(x0_parts)
    states = []
    for t in grid.student:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        states.append(teacher.schedule.add_noise(x0, noise, torch.full((n,), t, dtype=torch.long)))
    return StateSet(states, x0, prompts)


@torch.no_grad()
def target_error(teacher: Denoiser, student: Denoiser, grid: Grid, i: int, x: torch.Tensor, prompts: list[str],
                 *, guidance: float, threshold, batch_size: int, device: str) -> float:
    """Mean squared difference between the student's one-step and the teacher's T/S-step landing
    states over transition i, starting from the states x."""
    total, count = 0.0, 0
    for begin, end in _batches(len(x), batch_size):
        xb = x[begin:end].to(device)
        batch_prompts = prompts[begin:end]
        landed_teacher = ddim_path(teacher, xb, grid.teacher_path(i), teacher.encode(batch_prompts), guidance,
                                   threshold)
        landed_student = ddim_path(student, xb, grid.student_path(i), student.encode(batch_prompts), guidance,
                                   threshold)
        diff = (landed_student.float() - landed_teacher.float()).reshape(end - begin, -1)
        total += float((diff ** 2).mean(1).sum())
        count += end - begin
    return total / count


def measure_rows(teacher: Denoiser, student: Denoiser, grid: Grid, own: StateSet, reference: StateSet,
                 reference2: StateSet, *, guidance: float, threshold, max_dims: int, batch_size: int,
                 device: str, progress=None) -> list[dict]:
    """One row per student timestep (plus the clean end): fd, fd_floor, err_own, err_ref, err_ratio."""
    feats = lambda x: shift_features(x, max_dims)
    rows = []
    task = progress.add_task("  shift per timestep", total=grid.num_transitions) if progress is not None else None
    for i, t in enumerate(grid.student):
        err_own = target_error(teacher, student, grid, i, own.states[i], own.prompts, guidance=guidance,
                               threshold=threshold, batch_size=batch_size, device=device)
        err_ref = target_error(teacher, student, grid, i, reference.states[i], reference.prompts,
                               guidance=guidance, threshold=threshold, batch_size=batch_size, device=device)
        rows.append({"index": i, "timestep": t,
                     "fd": frechet_distance_features(feats(own.states[i]), feats(reference.states[i])),
                     "fd_floor": frechet_distance_features(feats(reference2.states[i]), feats(reference.states[i])),
                     "err_own": err_own, "err_ref": err_ref,
                     "err_ratio": err_own / err_ref if err_ref > 0 else (1.0 if err_own == 0 else math.inf)})
        if task is not None:
            progress.advance(task)
    rows.append({"index": grid.num_transitions, "timestep": -1,
                 "fd": frechet_distance_features(feats(own.final), feats(reference.final)),
                 "fd_floor": frechet_distance_features(feats(reference2.final), feats(reference.final)),
                 "err_own": None, "err_ref": None, "err_ratio": None})
    if task is not None:
        progress.remove_task(task)
    return rows


# ---- tables and plots --------------------------------------------------------------------------

def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid_of_axes(plt, n: int, title: str):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat[:n])


def plot_beta(results: dict[str, dict], metrics: list[str], path: Path) -> bool:
    """Metric vs teacher probability beta (beta 1: the teacher, 0: the student). False: nothing to plot."""
    points = sorted((r["value"], r["metrics"]) for r in results.values() if r["kind"] == "beta")
    metrics = [m for m in metrics if sum(p[1].get(m) is not None for p in points) >= 2]
    if not metrics:
        return False
    plt = _pyplot()
    fig, axes = _grid_of_axes(plt, len(metrics), "metric vs teacher probability beta")
    for ax, metric in zip(axes, metrics):
        xy = [(b, m[metric]) for b, m in points if m.get(metric) is not None]
        ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o")
        ax.set_xlabel("beta (probability the teacher takes a transition)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, plt, path)
    return True


def plot_switch(results: dict[str, dict], metrics: list[str], path: Path) -> bool:
    """Metric vs switch timestep t* for both directions; dashed: the teacher and student alone."""
    series = {kind: sorted((r["value"], r["metrics"]) for r in results.values() if r["kind"] == kind)
              for kind in ("t2s", "s2t")}
    metrics = [m for m in metrics if any(p[1].get(m) is not None for s in series.values() for p in s)]
    if not metrics:
        return False
    pure = {label: next((r["metrics"] for r in results.values() if r["kind"] == "beta" and r["value"] == v), {})
            for label, v in (("teacher alone", 1.0), ("student alone", 0.0))}
    labels = {"t2s": "teacher, then student", "s2t": "student, then teacher"}
    plt = _pyplot()
    fig, axes = _grid_of_axes(plt, len(metrics), "metric vs switch timestep t*")
    for ax, metric in zip(axes, metrics):
        for kind, points in series.items():
            xy = [(t, m[metric]) for t, m in points if m.get(metric) is not None]
            if xy:
                ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", label=labels[kind])
        for (label, m), style in zip(pure.items(), ("k--", "k:")):
            if m.get(metric) is not None:
                ax.axhline(m[metric], linestyle=style[1:], color=style[0], alpha=0.6, label=label)
        ax.set_xlabel("switch timestep t*")
        ax.set_ylabel(metric)
        ax.invert_xaxis()  # sampling runs from t = 999 down to 0
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, plt, path)
    return True


def plot_direct(measures: dict[str, list[dict]], path: Path, reference_label: str) -> bool:
    """FD to the reference marginal and teacher-target error vs timestep, one colour per student."""
    if not measures:
        return False
    plt = _pyplot()
    fig, (ax_fd, ax_err) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    x_of = lambda t: max(t, 0)  # the clean end (t = -1) drawn at 0
    for n, (label, rows) in enumerate(measures.items()):
        color = f"C{n}"
        ax_fd.plot([x_of(r["timestep"]) for r in rows], [r["fd"] for r in rows], marker="o", color=color, label=label)
        steps = [r for r in rows if r["err_own"] is not None]
        ax_err.plot([r["timestep"] for r in steps], [r["err_own"] for r in steps], marker="o", color=color,
                    label=f"{label}: on its own states")
        ax_err.plot([r["timestep"] for r in steps], [r["err_ref"] for r in steps], marker="x", linestyle="--",
                    color=color, label=f"{label}: on {reference_label} states")
    floor = next(iter(measures.values()))
    ax_fd.plot([x_of(r["timestep"]) for r in floor], [r["fd_floor"] for r in floor], color="gray", linestyle=":",
               label="sampling-noise floor")
    ax_fd.set_title(f"FD(student's states, {reference_label} marginal)")
    ax_err.set_title("teacher-target error (MSE of the landing state)")
    for ax in (ax_fd, ax_err):
        ax.set_xlabel("timestep (0 = clean samples)")
        ax.invert_xaxis()
        if all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")  # the values span orders of magnitude over the trajectory
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, plt, path)
    return True


def _save(fig, plt, path: Path) -> None:
    """Save under a hidden name and rename, so a reader never sees half a PNG."""
    from ddil_cli.atomic import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None

