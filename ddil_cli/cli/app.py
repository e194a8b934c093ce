"""The `ddil` Typer app and its entry point (user errors -> one line, exit 2)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
from typing import Optional

# our own rich bars report progress; the libraries' tqdm bars (weights loading, shard writing)
# would interleave with them. Set before transformers/diffusers are imported.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import click
import typer

from ddil_cli import __version__
from ddil_cli.cli.common import HELP_THREADS, default_threads, set_threads
from ddil_cli.errors import UserError
from ddil_cli.methods import METHODS

app = typer.Typer(
    name="ddil",
    help="DDIL: distil a slow diffusion teacher into a fast few-step student, with imitation-learning "
         "inputs (replay buffer of student states). Methods (ddil distill --method): "
         f"{', '.join(METHODS)}. Stages talk through folders: "
         "collect -> distill -> sample -> evaluate -> covariate-shift.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich would turn "gmm:ring:8" into an emoji
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)


def keep_examples(text: str) -> str:
    """Mark indented example paragraphs with click's no-rewrap marker so commands stay one line."""
    paragraphs = (text or "").split("\n\n")
    return "\n\n".join("\b\n" + p if p.startswith("  ") else p for p in paragraphs)


def with_threads(command):
    """`command` with a --threads option that sets torch's CPU threads before it runs (a command
    that has its own --threads keeps it; main() has already applied the default)."""
    signature = inspect.signature(command)
    if "threads" in signature.parameters:
        return command

    @functools.wraps(command)
    def run(*args, threads: Optional[int] = None, **kwargs):
        set_threads(threads)
        return command(*args, **kwargs)

    option = inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[int],
                               default=typer.Option(None, help=HELP_THREADS))
    run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), option])
    run.__annotations__ = {**command.__annotations__, "threads": Optional[int]}
    return run


def _register():
    from ddil_cli.cli.collect import collect_command
    from ddil_cli.cli.distill import distill_command
    from ddil_cli.cli.encode import encode_command
    from ddil_cli.cli.evaluate import evaluate_command
    from ddil_cli.cli.sample import sample_command
    from ddil_cli.cli.shift import covariate_shift_command
    from ddil_cli.cli.teacher import teacher_command

    for name, command in (("collect", collect_command), ("distill", distill_command),
                          ("sample", sample_command), ("evaluate", evaluate_command),
                          ("covariate-shift", covariate_shift_command), ("teacher", teacher_command),
                          ("encode", encode_command)):
        app.command(name, help=keep_examples(command.__doc__))(with_threads(command))


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    if version:
        typer.echo(f"ddil-cli {__version__}")
        raise typer.Exit()


_register()


def _click_modules():
    """click's exceptions, and those of the click copy that newer typer releases vendor."""
    modules = [click.exceptions]
    try:
        from typer._click import exceptions as vendored

        modules.append(vendored)
    except ImportError:
        pass
    return modules


_USAGE = tuple(m.UsageError for m in _click_modules())
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)


def print_error(message: str) -> None:
    """`error: MESSAGE` as one literal line on stderr: no markup, no emoji codes, no line breaks
    (a path or a lab spec such as gmm:ring:8 is printed exactly as the user must type it)."""
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as `warning: MESSAGE` lines, without the source location and code line."""
    return f"warning: {' '.join(str(message).split())}\n"


def _quiet_library_bars() -> None:
    """The environment variable above is read at import; when transformers or diffusers were
    imported first (a program calling main()), switch their weight-loading bars off directly."""
    for name in ("transformers", "diffusers"):
        module = sys.modules.get(name)
        if module is not None:
            module.utils.logging.disable_progress_bar()


_SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells report it
_received: list[str] = []


def _interrupt(signum, _frame) -> None:
    """Ctrl-C and SIGTERM alike raise KeyboardInterrupt, so every `finally` and atomic publisher
    cleans up (a SIGTERM's default action kills the process without that); the name is kept
    for the exit status."""
    import signal

    _received.append(signal.Signals(signum).name)
    raise KeyboardInterrupt


def _report_interrupt() -> None:
    from ddil_cli.atomic import what_an_interrupt_kept

    name = _received[-1] if _received else "SIGINT"
    print_error(f"interrupted ({'Ctrl-C' if name == 'SIGINT' else name}); kept: {what_an_interrupt_kept()}")
    sys.exit(_SIGNAL_EXIT.get(name, 130))


@contextlib.contextmanager
def _signals_interrupt():
    """Route SIGINT and SIGTERM to `_interrupt` while the app runs (main thread only: a program
    calling main() from another thread keeps its own handling)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    _received.clear()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> None:
    """Run the app; problems the user can fix end in one line on stderr and exit code 2; an
    interrupt in one line saying what was kept, exit code 130 (Ctrl-C) or 143 (SIGTERM)."""
    import warnings

    from ddil_cli.atomic import disk_full_error

    formatted = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    _quiet_library_bars()
    try:
        with _signals_interrupt():
            set_threads(default_threads())
            code = app(args=argv, standalone_mode=False, prog_name="ddil")
            if _received or code == 130:  # typer turns KeyboardInterrupt into a returned 130
                _report_interrupt()
            if isinstance(code, int) and code:
                sys.exit(code)
    except KeyboardInterrupt:  # one outside the command (while arguments are parsed)
        _report_interrupt()
    except UserError as exc:
        print_error(str(exc))
        sys.exit(2)
    except _USAGE as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `ddil`: the help is the answer
            typer.echo(exc.format_message())
            sys.exit(0)
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        print_error(f"{exc.format_message()}{where}")
        sys.exit(2)
    except _EXIT as exc:
        sys.exit(exc.exit_code)
    except _ABORT:
        _report_interrupt()
    except Exception as exc:  # a full disk is the user's to fix; anything else is a bug and raises
        full = disk_full_error(exc)
        if full is None:
            raise
        print_error(str(full))
        sys.exit(2)
    finally:
        warnings.formatwarning = formatted
