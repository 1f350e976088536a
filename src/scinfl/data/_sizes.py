"""The sizes a synthetic data set is asked for, checked before anything is drawn."""

from __future__ import annotations

import numbers


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
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
