"""What every command shares: config files, output folders, devices, progress, errors."""

from __future__ import annotations

import dataclasses
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TypeVar

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from ddil_cli.atomic import atomic_folder, kept_if_interrupted, output_lock, remove_stale_partials, writable_parent
from ddil_cli.errors import UserError
from ddil_cli.validate import Rule, check_values

# emoji=False: ":ring:" in "gmm:ring:8" is not an emoji; summaries escape user text for markup
console = Console(stderr=True, emoji=False, highlight=False)
Config = TypeVar("Config")

# Help texts of the options every command has.
HELP_CONFIG = "TOML or YAML file whose keys mirror the flags (e.g. teacher_steps = 32); flags override it."
HELP_SEED = "Random seed: the same seed on the same machine gives the same files."
HELP_DEVICE = "auto (cuda if present, else cpu), cpu, cuda or cuda:N."
HELP_QUIET = "No progress bars or tables (for scripts)."
HELP_FROZEN_DTYPE = ("The networks' dtype (none is trained here): auto (bf16 on CUDA, fp32 on CPU), fp32, "
                     "bf16 or fp16; the VAE stays fp32.")
HELP_OVERWRITE = "Replace an existing non-empty --out folder (it is swapped only once the run succeeds)."
HELP_THREADS = ("torch CPU threads. Default: 1 where 2 cores or fewer are available (on 2 shared cores a "
                "second thread made training steps many times slower, docs/install.md), else half the cores, "
                "at most 8; with OMP_NUM_THREADS set and no --threads, torch's own count.")


def _unique_key_loader():
    """yaml's SafeLoader, refusing a key given twice in one table (it would keep the last one
    silently; TOML refuses it too)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def load_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a folder; pass a .toml or .yaml file to --config")
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass an existing .toml or .yaml file to --config")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not syntax
        if path.suffix.lower() == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_unique_key_loader()) or {}
        else:
            raise UserError(f"config file {path} must end in .toml, .yaml or .yml")
    except UserError:
        raise
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
    except Exception as exc:  # the parsers' own messages name line and column
        raise UserError(f"config file {path} could not be parsed ({' '.join(str(exc).split())}); "
                        "fix its syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a table of option = value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_config(ctx: typer.Context, cls: type[Config], config_file: Path | None,
                   rules: dict[str, Rule] | None = None, options_keys: tuple[str, ...] = ()) -> Config:
    """defaults < config file < flags given on the command line. Unknown file keys are errors;
    every value is checked against its field's type and `rules` (validate.py) before the
    command does anything.

    `options_keys` are flags and file keys gathered into the config's `options` dict (a
    method's own settings, given ones only; the method checks their types and ranges)."""
    fields = {f.name for f in dataclasses.fields(cls)} | set(options_keys)
    file_values = load_config_file(config_file)
    unknown = sorted(set(file_values) - fields)
    if unknown:
        raise UserError(f"config file {config_file} has unknown key(s) {', '.join(unknown)}; "
                        f"valid keys: {', '.join(sorted(fields))}")
    values = {}
    for name in fields:
        if name not in ctx.params:
            continue
        source = ctx.get_parameter_source(name)
        # by name: typer vendors its own click, whose enum is not click's
        given = source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
        if name in file_values and not given:
            values[name] = file_values[name]
        else:
            values[name] = ctx.params[name]
    from_file = {name for name in file_values if values.get(name, file_values[name]) is file_values[name]}
    for name, value in file_values.items():
        values.setdefault(name, value)
    for name, value in values.items():  # Paths and tuples become plain JSON-able values
        if isinstance(value, Path):
            values[name] = str(value)
        elif isinstance(value, tuple):
            values[name] = list(value)
        if isinstance(values[name], str) and (values[name] == "~" or values[name].startswith("~/")):
            # the shell leaves ~ alone after `--out=` and in quotes: a folder named "~" was created
            values[name] = os.path.expanduser(values[name])
    gathered = {k: values.pop(k) for k in options_keys if k in values}
    values = check_values(cls, values, rules or {}, from_file={n: config_file for n in from_file})
    if options_keys:
        values["options"] = {**(values.get("options") or {}), **{k: v for k, v in gathered.items() if v is not None}}
    return cls(**values)


def distributed_context() -> tuple[int, int, int, str | None]:
    """(rank, world size, local rank, launch key) from the torchrun / accelerate launch environment.

    The launch key (the rendezvous id and master address) lets every rank of one launch join one
    collect run without a process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0, None
    key = ":".join(os.environ.get(name, "") for name in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))
    return int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")), key


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


MAX_THREADS = 1024  # more is a typo (torch overflows on a 64-bit count)


def default_threads() -> int | None:
    """The torch thread count a run gets without --threads; None leaves OMP_NUM_THREADS's choice."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = available_cores()
    return 1 if cores <= 2 else min(cores // 2, 8)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def default_workers() -> int:
    """Data loader worker processes: none on 2 cores or fewer (they would take the cores the
    networks run on), else half the cores, at most 8."""
    cores = available_cores()
    return 0 if cores <= 2 else min(cores // 2, 8)


def set_threads(threads: int | None) -> None:
    """Use `threads` torch CPU threads from here on (None: change nothing)."""
    if threads is None:
        return
    if not 1 <= threads <= MAX_THREADS:
        raise UserError(f"--threads must be in [1, {MAX_THREADS}], got {threads}")
    import torch

    torch.set_num_threads(threads)


def _local_path(value: Any) -> Path | None:
    """The existing local file or folder an input option names, or None (a lab spec, a hub id, a
    pipe: URL). A shard pattern ('data/train-{0..9}.tar', 'data/*.tar') names its folder."""
    if value is None or isinstance(value, bool) or not isinstance(value, (str, Path)):
        return None
    text = str(value)
    if "=" in text and not Path(text).exists():  # covariate-shift's LABEL=DIR
        text = text.split("=", 1)[1]
    if text.startswith("pipe:") or not text:
        return None
    wild = min((i for i in (text.find(c) for c in "{*?[") if i >= 0), default=-1)
    path = Path(os.path.dirname(text[:wild]) or ".") if wild >= 0 else Path(text).expanduser()
    return path.resolve() if path.exists() else None


def check_out_apart(out: str | Path, inputs: dict[str, Any]) -> None:
    """UserError when --out (resolved, symlinks followed) is an input, lies inside one or holds
    one: writing it (with --overwrite, replacing it) would destroy that input. `inputs` maps
    each input flag to its value (a path, a list of them, or None). Checked before anything is
    written, with or without --overwrite."""
    target = Path(out).expanduser().resolve()
    if not str(out).strip() or not target.name:
        raise UserError(f"--out {str(out)!r} names no folder of its own; give one such as runs/name")
    if Path.cwd().resolve().is_relative_to(target):  # replacing it would take the user's files with it
        raise UserError(f"--out {out} is or holds the current folder; give a folder of its own such as runs/name")
    for flag, values in inputs.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            path = _local_path(value)
            if path is None:
                continue
            how = ("is" if path == target else "lies inside" if target.is_relative_to(path)
                   else "holds" if path.is_relative_to(target) else None)
            if how is not None:
                raise UserError(f"--out {out} {how} the input {flag} {value}; writing it would destroy that "
                                "input: choose an --out apart from every input")


@contextmanager
def output_dir(out: str | Path, *, overwrite: bool = False, what: str = "ddil") -> Iterator[Path]:
    """Yield a hidden work folder beside `out`, renamed to `out` only when the block succeeds.

    A failure or interrupt leaves `out` as it was (absent, or the old one with --overwrite).
    One writer at a time (`output_lock`); partial folders of a dead earlier run are removed.
    """
    out = Path(out)

    def check_free() -> None:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; give a folder path")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise UserError(f"--out {out} already exists and is not empty; choose another folder or pass --overwrite")

    check_free()
    writable_parent(out)
    kept = f"nothing: --out {out} is as it was" if out.exists() else f"nothing: --out {out} was not created"
    with output_lock(out, what), kept_if_interrupted(kept):
        check_free()  # again under the lock: a run that just finished may have written it
        remove_stale_partials(out)
        with atomic_folder(out, replace=True) as work:
            yield work


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f}/s" if speed else "-/s", style="progress.data.speed")


def progress(quiet: bool = False) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=quiet, transient=False)
