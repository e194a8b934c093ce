"""Run `ddil ARGS...` in-process through the real entry point, as a user's shell would."""

from ddil_cli.cli.app import main


def run_cli(argv, capsys=None, *, with_stdout: bool = False) -> tuple[int, str]:
    """(exit code, what the user saw on stderr [+ stdout])."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    if capsys is None:
        return code, ""
    captured = capsys.readouterr()
    return code, captured.err + (captured.out if with_stdout else "")
