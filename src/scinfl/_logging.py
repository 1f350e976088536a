"""Where scinfl's info lines go: shown by default, as scvi-tools shows its own.

scinfl adapts to data where adapting is what a user wants (a small site's batch size, features
aligned by name, categories without rows dropped) and says so at the ``INFO`` level. A library
logger shows only warnings unless it is given a handler, so, as scvi-tools does for ``"scvi"``,
the ``"scinfl"`` logger gets one (rich, on standard error, looked up when a line is written)
if it has none. ``logging.getLogger("scinfl").setLevel(logging.WARNING)`` silences them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.logging import RichHandler


def configure_logging(level: int | None = None) -> None:
    """Show the ``"scinfl"`` logger's lines from ``level`` on (a handler added if it has none).

    ``None`` (at import): ``INFO``, unless the user set the logger's level before.

    Examples
    --------
    >>> import logging
    >>> configure_logging(logging.WARNING)
    >>> logging.getLogger("scinfl").level == logging.WARNING
    True
    >>> configure_logging(logging.INFO)
    """
    logger = logging.getLogger("scinfl")
    if level is not None:
        logger.setLevel(level)
    elif logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not logger.handlers:
        # a console without a file writes to the sys.stderr of the moment (Jupyter, pytest)
        handler = RichHandler(
            level=logging.NOTSET, show_path=False, show_time=False, console=Console(stderr=True)
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_unless_the_root_shows_it)
        logger.addHandler(handler)


def _unless_the_root_shows_it(record: logging.LogRecord) -> bool:
    """Whether no handler of the root logger prints ``record`` (which propagates there).

    Where the root logger has a handler (the user's ``logging.basicConfig``, or one set up by
    a library, as mudata's ``logging.info`` calls do), that handler prints scinfl's lines:
    this one stays silent, so that no line shows twice.
    """
    return not any(handler.level <= record.levelno for handler in logging.getLogger().handlers)


@contextmanager
def quiet(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise the level of the loggers ``names`` for a block (lines that are not news there).

    Examples
    --------
    >>> with quiet("scvi.data._download"):
    ...     logging.getLogger("scvi.data._download").level
    30
    """
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, levels, strict=True):
            logger.setLevel(old)
