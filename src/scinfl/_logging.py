"""Where scinfl's info lines go: shown as scvi-tools shows its own, at its verbosity.

scinfl adapts to data where adapting is what a user wants (a small site's batch size, features
aligned by name, categories without rows dropped) and says so at the ``INFO`` level. A library
logger shows only warnings unless it is given a handler, so, as scvi-tools does for ``"scvi"``,
the ``"scinfl"`` logger gets one (rich, on standard error, looked up when a line is written)
if it has none. Until its level is set, the ``"scinfl"`` logger's level is scvi-tools'
verbosity: ``scvi.settings.verbosity = logging.WARNING`` silences both libraries' info lines;
``logging.getLogger("scinfl").setLevel(...)`` sets scinfl's alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.logging import RichHandler


class _FollowsScviVerbosity(logging.Logger):
    """A logger whose level, until one is set, is that of scvi-tools' logger.

    Loggers below it (``"scinfl.model._validation"``, ...) read this level as their own, so
    ``scvi.settings.verbosity`` (which sets the ``"scvi"`` logger's level) applies to every
    scinfl line; setting a level here (``setLevel``) overrides it, also when code that saved
    the level puts it back (pytest's ``caplog.at_level``): ``setLevel(logging.NOTSET)``
    follows scvi-tools again.
    """

    @property
    def level(self) -> int:
        own = self.__dict__.get("_own_level", logging.NOTSET)
        return own if own != logging.NOTSET else logging.getLogger("scvi").getEffectiveLevel()

    @level.setter
    def level(self, value: int) -> None:
        self.__dict__["_own_level"] = value


def configure_logging(level: int | None = None) -> None:
    """Show the ``"scinfl"`` logger's lines from ``level`` on (a handler added if it has none).

    Parameters
    ----------
    level
        A logging level; ``None`` (at import): scvi-tools' verbosity
        (``scvi.settings.verbosity``, ``INFO`` unless changed), unless the user set the
        logger's level before.

    Examples
    --------
    >>> import logging
    >>> configure_logging(logging.WARNING)
    >>> logging.getLogger("scinfl").level == logging.WARNING
    True
    >>> configure_logging(logging.INFO)
    """
    logger = logging.getLogger("scinfl")
    if not isinstance(logger, _FollowsScviVerbosity):
        # the "scinfl" logger may exist already (a level set before scinfl was imported): it
        # keeps that level as its own
        own = logger.__dict__.pop("level", logging.NOTSET)
        logger.__class__ = _FollowsScviVerbosity
        logger.level = own
    if level is not None:
        logger.setLevel(level)
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
