"""Logging for the command line, set up once in `visionflow.cli.main`: visionflow's own INFO
lines, and from other libraries only their warnings, unless asked for more.

Why: torch.onnx's exporter (onnx_ir, onnxscript) logs some 80 INFO lines per ONNX export (80 of
the 94 lines of a `visionflow promote`), MLflow its INFO lines in this process and in the
servers it starts, and a CloudPickle warning on every registration.

    (none)  visionflow INFO; other libraries WARNING (MLflow's too, via MLFLOW_LOGGING_LEVEL,
            which the `mlflow server` of `visionflow ui mlflow` inherits)
    -v      visionflow DEBUG; other libraries INFO, and the known warnings below
    -vv     everything DEBUG, per-request HTTP logs included
"""
from __future__ import annotations

import logging
import os

OWN = "visionflow"
# Per-request logs of HTTP clients and migrations: noise even with -v.
CHATTY = ("httpx", "httpcore", "alembic", "urllib3")
# Warnings that say nothing a user of visionflow can act on, by logger and message start.
KNOWN_WARNINGS: dict[str, tuple[str, ...]] = {
    # the register stage logs its pyfunc as a Python object on purpose (visionflow's code ships
    # with it as code_paths); MLflow warns about that on every registration
    "mlflow.pyfunc": ("Passing a Python object as `python_model`",),
}


class _DropKnown(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def setup_logging(verbosity: int = 0) -> None:
    """Levels and format of the command's logs; `verbosity` is the number of -v flags."""
    logging.basicConfig(
        level=logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger(OWN).setLevel(logging.INFO if verbosity == 0 else logging.DEBUG)
    if verbosity < 2:
        for name in CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
    else:
        # Not DEBUG even with -vv: websockets' DEBUG lines dump every frame, and the first one
        # Prefect's client sends (events, logs) carries PREFECT_API_AUTH_STRING / the API key in clear.
        logging.getLogger("websockets").setLevel(logging.INFO)
    if verbosity == 0:
        # MLflow sets its loggers' level from this variable when it is imported (here, or in a
        # server process started from here), so a level set now would be overwritten.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name, starts in KNOWN_WARNINGS.items():
            logger = logging.getLogger(name)
            if not any(isinstance(f, _DropKnown) for f in logger.filters):  # main() may run twice in a process
                logger.addFilter(_DropKnown(starts))
