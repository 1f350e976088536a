"""A Grid whose waits end when the run is cancelled (an interrupted Flower simulation)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class RunCancelledError(RuntimeError):
    """The run was cancelled (e.g. Ctrl-C in the notebook running a simulation)."""


class CancellableGrid:
    """``grid``, its ``send_and_receive`` giving up once ``cancelled`` is set.

    Flower's simulation runs the ServerApp in a thread of the caller's process. When the
    caller is interrupted (Ctrl-C), the sites stop answering, and Flower's own
    ``send_and_receive`` (a push, then pulls until every reply or the timeout, ``None``: no
    timeout) would wait forever in a thread the process waits for at exit. This one pulls the
    same way and stops with :class:`RunCancelledError` once the event is set; every other
    attribute is the grid's.

    Examples
    --------
    >>> class Silent:  # a grid whose nodes never answer
    ...     pull_interval = 0.01
    ...     def push_messages(self, messages): return ["id"]
    ...     def pull_messages(self, ids): return []
    >>> cancelled = threading.Event()
    >>> cancelled.set()
    >>> CancellableGrid(Silent(), cancelled).send_and_receive([])
    Traceback (most recent call last):
    ...
    scinfl.federated.flower._cancellable_grid.RunCancelledError: The run was cancelled while waiting for 1 site(s).
    """

    def __init__(self, grid: Grid, cancelled: threading.Event) -> None:
        self._grid = grid
        self._cancelled = cancelled

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Push ``messages``, then pull replies until all are in, the timeout, or cancellation."""
        waiting = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.time() + timeout
        replies: list[Message] = []
        while waiting and (end is None or time.time() < end):
            if self._cancelled.is_set():
                raise RunCancelledError(
                    f"The run was cancelled while waiting for {len(waiting)} site(s)."
                )
            pulled = list(self._grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if waiting:
                time.sleep(getattr(self._grid, "pull_interval", 0.1))
        return replies
