"""Typed errors. The core raises these; the CLI maps them to one clear line and an exit code.

Every message says what went wrong *and* what to do about it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose pipe's reader went away
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

# How long the processes of one split image wait for each other before all of them stop with an error: a 16K UNet
# pass takes seconds, so a process silent for ten minutes is gone.
DEFAULT_TIMEOUT_S = 600.0


class LinFusionError(Exception):
    """Base class of every error linfusion raises on purpose."""

    exit_code: int = EXIT_FAILURE


class UsageError(LinFusionError):
    """A flag, size, preset or file that cannot be used as given (exit 2)."""

    exit_code = EXIT_USAGE


class JobFileError(UsageError):
    """A prompt/job file that does not parse or validate; names the file, line and field."""


class ModelNotFoundError(UsageError):
    """A local model path that does not exist (exit 2)."""


class UnusableModelError(UsageError):
    """A model file that is there but is no model we can load (not a checkpoint, not safetensors): bad input."""


class ModelLoadError(LinFusionError):
    """A model that exists but cannot be loaded (offline and not cached, wrong format...)."""


class UnsafeFileError(UsageError):
    """A pickle-based weights file refused without --allow-pickle."""


class CheckpointError(LinFusionError):
    """A LinFusion checkpoint that does not match the UNet (missing key, shape, module name)."""


class UnknownArchitectureError(LinFusionError):
    """A UNet whose architecture is not in the family table."""


class OutOfMemoryError(LinFusionError):
    """A stage ran out of device memory even after stepping down to the most frugal plan."""


class NumericalError(LinFusionError):
    """NaN/inf or an all-black image that an fp32 retry did not fix."""


class OutputError(LinFusionError):
    """An output folder or file that cannot be written (permissions, full disk, name clash)."""


class OutputFolderError(UsageError):
    """An --out folder that cannot be created or written: bad input, reported before any model loads (exit 2)."""


class DiskFullError(OutputError):
    """No space (or quota) left: not one job's fault, so a batch stops instead of failing every job in turn."""


class OutputClosedError(LinFusionError):
    """stdout was closed under us (`| head -1` read its line, or `>&-`): results can no longer be given."""

    exit_code = EXIT_PIPE


class InputImageError(UsageError):
    """An input image that cannot be read: not an image, truncated, too many pixels."""


class Interrupted(LinFusionError):
    """The run was stopped by SIGINT/SIGTERM at a safe point; exit_code says which."""

    def __init__(self, signal_name: str, exit_code: int, resumable: bool = False) -> None:
        """`resumable`: rerunning the command picks up where it stopped (a batch, a distillation); one image with
        a random seed cannot be "resumed", it is made again."""
        tail = "finished outputs are kept: rerun the same command to resume" if resumable else "nothing was saved"
        super().__init__(f"interrupted by {signal_name}; {tail}")
        self.signal_name = signal_name
        self.exit_code = exit_code
