"""The sizes a synthetic data set is asked for, checked before anything is drawn."""

from __future__ import annotations

from scinfl._checks import check_value


def check_sizes(**sizes: int) -> None:
    """Refuse a size that is not a positive integer, naming the argument.

    Examples
    --------
    >>> check_sizes(n_obs=10, n_sites=2)
    >>> check_sizes(n_sites=0)
    Traceback (most recent call last):
    ...
    ValueError: n_sites must be an integer >= 1, got 0.
    """
    for name, value in sizes.items():
        check_value(name, value, int, "an integer >= 1", lambda v: v >= 1)
