"""The command-line edge every fastsam2 command shares: errors a user can cause become one
`error:` line and their exit code, signals unwind the program as exceptions.

- `cli_errors()`: a command's body. FastSam2Error -> "error: <one line>", exit 2 (3 for an
  input cut short); Ctrl-C -> exit 130, SIGTERM -> 143, SIGHUP -> 129, with one line saying the
  finished files are kept. Anything else is a bug in fastsam2 and keeps its traceback.
- `signals_as_exceptions()`: SIGTERM/SIGHUP raise Terminated where the program was (SIGINT is
  KeyboardInterrupt already), so the `with` blocks that write files atomically remove their temp
  files on the way out.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import threading

from fastsam2.runtime.errors import FastSam2Error

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# torch.load(weights_only=True)'s message advises turning weights_only off (which would run the
# file's code): the line says what the refusal means instead
NOT_UNPICKLED = ("it holds Python objects besides tensors and plain containers, which fastsam2 does not "
                 "unpickle (a state dict saved with torch.save loads)")
INTERRUPTED = "the files finished so far are kept, partial ones removed"


def one_line(e: BaseException) -> str:
    """The `error:` line's text for a user error: colours stripped, whitespace collapsed."""
    text = ANSI.sub("", str(e))
    text = re.sub(r"Weights only load failed.*", NOT_UNPICKLED, text, flags=re.S)
    return " ".join(text.split())


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Terminated(BaseException):
    """A SIGTERM/SIGHUP raised where the program was, like KeyboardInterrupt for Ctrl-C: not an
    Exception, so only cleanup (`with`, `finally`, `except BaseException`) sees it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


def exit_code_of(exc: BaseException) -> int | None:
    """The shell's exit status for a run stopped by exc: 130 for Ctrl-C, 128 + N for signal N."""
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if isinstance(exc, Terminated):
        return exc.exit_code
    return None


@contextlib.contextmanager
def signals_as_exceptions(signals=(signal.SIGTERM, signal.SIGHUP)):
    """Inside the block, each of `signals` raises Terminated once (a second one while the first
    unwinds is ignored, so cleanup finishes); handlers are restored after. Only the main thread
    can set handlers: elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = []

    def handler(signum, frame):
        if not raised:
            raised.append(signum)
            raise Terminated(signum)

    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def cli_interrupts(echo=None, interrupted: str = INTERRUPTED):
    """A CLI's body: SIGTERM/SIGHUP/Ctrl-C unwind it as exceptions (temp files removed by the
    writers' own cleanup), then one `error:` line and exit 130 / 128 + signal."""
    echo = echo or _stderr
    try:
        with signals_as_exceptions():
            yield
    except (KeyboardInterrupt, Terminated) as e:
        how = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else str(e)
        echo(f"error: interrupted by {how}; {interrupted}")
        sys.exit(exit_code_of(e))


@contextlib.contextmanager
def cli_errors(echo=None, interrupted: str = INTERRUPTED):
    """A command's body: user errors and signals become one `error:` line and the exit code."""
    echo = echo or _stderr
    try:
        with cli_interrupts(echo, interrupted):
            yield
    except FastSam2Error as e:
        echo(f"error: {one_line(e)}")
        sys.exit(e.exit_code)


class UsageLine(Exception):
    """A click usage error (a missing required option, a value click cannot parse) as one
    `error:` line and exit 2, as every other user error (click prints a usage block)."""

    exit_code = 2

    def __init__(self, e):
        # a 5000-digit value is shown by its start and its length, as every other message does
        text = " ".join(w if len(w) <= 80 else f"{w[:40]}... ({len(w)} characters)"
                        for w in one_line(e.format_message()).rstrip(".").split())
        text = text[:1].lower() + text[1:] if text[1:2].islower() else text
        where = e.ctx.command_path if getattr(e, "ctx", None) else None
        super().__init__(f"{text} (see {where} --help)" if where else f"{text} (see --help)")


def _one_line_usage(cls):
    """A click Command/Group class whose usage errors are one `error:` line, exit 2."""
    import click

    class OneLine(cls):  # noqa: D401 (click calls these two where usage errors arise)
        def make_context(self, info_name, args, parent=None, **extra):
            try:
                return super().make_context(info_name, args, parent=parent, **extra)
            except click.UsageError as e:
                _stderr(f"error: {UsageLine(e)}")
                sys.exit(UsageLine.exit_code)

        def resolve_command(self, ctx, args):  # a group's unknown subcommand
            try:
                return super().resolve_command(ctx, args)
            except click.UsageError as e:
                _stderr(f"error: {UsageLine(e)}")
                sys.exit(UsageLine.exit_code)

    OneLine.__name__ = f"OneLine{cls.__name__}"
    return OneLine


def command_class():
    """`@click.command(cls=command_class())`: usage errors as one line."""
    import click

    return _one_line_usage(click.Command)


def group_class():
    import click

    return _one_line_usage(click.Group)
