"""Where fastsam2's log messages go while a command runs: library code logs through
`logging.getLogger(__name__)` (every logger under "fastsam2."); a command wraps its body in
`messages(...)`, the one handler that prints each message as it is, with no level prefix, on
stderr (or stdout) for the command's duration. Outside a command nothing is configured: INFO is
dropped, warnings go where Python's logging sends them, stdout stays the caller's."""

from __future__ import annotations

import contextlib
import logging
import sys

ROOT = "fastsam2"


class _Console(logging.Handler):
    """One line per message: `echo(line)` when given, else the stream as it is at that moment
    (click's CliRunner and pytest swap sys.stdout/sys.stderr after the handler is made)."""

    def __init__(self, err: bool, echo=None):
        super().__init__(logging.INFO)
        self.err, self.echo = err, echo

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)  # the default format is the message alone
            if self.echo is not None:
                self.echo(line)
                return
            stream = sys.stderr if self.err else sys.stdout
            stream.write(line + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 (logging's own contract: a failed emit never raises)
            self.handleError(record)


@contextlib.contextmanager
def messages(err: bool = True, quiet: bool = False, echo=None):
    """Inside the block fastsam2's INFO-and-above messages print as plain lines on stderr (err)
    or stdout, or go to `echo(line)`; `quiet`: none at all, warnings included. Not passed on to
    the root logger meanwhile, so a root handler set up by another library prints no copy."""
    logger = logging.getLogger(ROOT)
    handler = logging.NullHandler() if quiet else _Console(err, echo)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
