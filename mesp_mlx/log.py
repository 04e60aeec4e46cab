"""Progress messages: one logger for the whole package, and where its lines go.

Library code calls `say(text)`. The lines go to `print` unless a caller routes them
elsewhere for a block of code: `with to(fn):` (a notebook's own function, a progress
bar's `write`, or `silent` on the ranks other than 0 of a data-parallel run).
The logger is the standard `logging.getLogger("mesp_mlx")`, so its level can also be
set the usual way.
"""

import logging
from contextlib import contextmanager
from typing import Callable, Optional

logger = logging.getLogger("mesp_mlx")


class _Sink(logging.Handler):
    """Hands each message to the current function (print unless routed)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.fn: Optional[Callable] = None

    def emit(self, record):
        (self.fn or print)(record.getMessage())


_sink = _Sink()
logger.addHandler(_sink)
logger.setLevel(logging.INFO)
logger.propagate = False


def say(text: str) -> None:
    logger.info(text)


def silent(*_args, **_kw) -> None:
    """A destination that drops every line (ranks other than 0)."""


@contextmanager
def to(fn: Optional[Callable]):
    """Within the block, lines go to fn(text); None leaves them where they go."""
    if fn is None:
        yield
        return
    old, _sink.fn = _sink.fn, fn
    try:
        yield
    finally:
        _sink.fn = old
