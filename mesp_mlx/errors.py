"""Every error a user can cause, in one ground-floor module.

A `UserError` is bad input (a flag, a file, a model, a budget): the CLI prints its
message as one line and exits 1, never a traceback. The other classes here are the
specific kinds; each also derives from the builtin its callers may expect
(ValueError, OSError, RuntimeError).
"""

import argparse
import sys


class UserError(Exception):
    """Bad input from the user: the CLI prints the message, no traceback."""


class ConfigError(UserError, ValueError):
    """An invalid option value or YAML file."""


class DataError(UserError, ValueError):
    """Missing, malformed or unusable training data."""


class ModelLoadError(UserError):
    """The model could not be found or loaded."""


class UnsupportedModelError(UserError, ValueError):
    """The per-block engine cannot run this model (autodiff can)."""


class SpecMismatchError(ValueError):
    """The spec's forward differs from the model's: its gradients would be wrong."""


class AdapterError(UserError):
    """Adapter files missing, incomplete or not matching the model."""


class WeightsFileError(UserError, OSError):
    """A weights file is unreadable, truncated, or changed while it was in use."""


class CheckpointSpaceError(UserError, OSError):
    """The checkpoint directory cannot hold the checkpoints."""


class DivergenceError(UserError):
    """Training produced a non-finite loss, gradient or parameter."""


class DistributedError(UserError):
    """Another rank failed, hung or disagreed: every rank stops with this."""


class MemoryBudgetError(UserError, RuntimeError):
    """The pre-flight estimate exceeds the memory budget; .estimate, .advice
    (what would fit) and .summary (one line) for callers that format it."""

    def __init__(self, msg, estimate=None, advice=(), summary=""):
        super().__init__(msg)
        self.estimate, self.advice, self.summary = estimate, list(advice), summary


class Parser(argparse.ArgumentParser):
    """argparse with exit status 1 (a user error) instead of 2 for bad flags."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")
