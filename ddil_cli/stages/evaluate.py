"""`ddil evaluate` stage: the implementation lives with the metrics in ddil_cli.evaluate.run."""

from ddil_cli.evaluate.run import EvaluateConfig, evaluate  # noqa: F401
