"""The errors a user can cause. The CLIs turn each into one line and a non-zero exit.

Anything else that escapes is a bug in fastsam2 and keeps its traceback.
"""


class FastSam2Error(Exception):
    """Base class: a problem with what the user gave us, printed as one line."""

    exit_code = 2


class InputError(FastSam2Error):
    """A bad argument, video, frame folder, prompt, point or box."""


class BundleError(FastSam2Error):
    """A bundle that is missing, changed since export, or from another version/GPU."""


class CheckpointError(FastSam2Error):
    """A checkpoint or config that cannot be loaded or does not match."""


class BackendError(FastSam2Error):
    """A backend that is not installed or cannot run the bundle here."""


class OutputError(FastSam2Error):
    """An output folder that exists (without --force) or cannot be written."""


class IncompleteInputError(FastSam2Error):
    """The input ended before it said it would (a video cut short: fewer frames decoded than
    its container declares). The outputs of the frames that were read are complete and kept."""

    exit_code = 3


class SourceError(InputError):
    """A live source (camera, network stream) that cannot be opened or stopped delivering."""


def quoted(value, limit: int = 60) -> str:
    """A user's value as an error message repeats it: quoted, and cut when long (a 10 KB
    prompt is not echoed back whole)."""
    text = str(value)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"
