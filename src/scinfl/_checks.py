"""Checks of argument values shared across the package, each naming the argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np


def check_value(
    name: str,
    value: Any,
    kind: type,
    allowed: str,
    condition: Callable[[Any], bool] | None = None,
) -> None:
    """Refuse a value of the wrong type (``"no"`` for a bool) or out of its range.

    ``kind`` is ``bool``, ``int`` (integers, never booleans) or ``float`` (finite real
    numbers, never booleans); ``allowed`` says what is accepted, in the message.

    Examples
    --------
    >>> check_value("lr", 1e-3, float, "a number > 0", lambda v: v > 0)
    >>> check_value("balance_classes", "no", bool, "True or False")
    Traceback (most recent call last):
    ...
    ValueError: balance_classes must be True or False, got 'no'.
    """
    if kind is bool:
        valid = isinstance(value, bool | np.bool_)
    elif kind is int:
        valid = isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)
    else:
        valid = (
            isinstance(value, numbers.Real)
            and not isinstance(value, bool | np.bool_)
            and math.isfinite(value)
        )
    if not valid or (condition is not None and not condition(value)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")


def check_not_empty(n_obs: int, what: str = "observations", name: str = "adata") -> None:
    """Refuse data without rows (everything filtered out), before a library fails on it.

    Examples
    --------
    >>> check_not_empty(0, "spots")
    Traceback (most recent call last):
    ...
    ValueError: adata has no spots (empty after filtering?).
    """
    if n_obs == 0:
        raise ValueError(f"{name} has no {what} (empty after filtering?).")


def check_obs_column_free(adata, key_added: str, is_ours: Callable[[Any], bool], tool: str) -> None:
    """Refuse to overwrite an ``.obs`` column that holds data rather than ``tool``'s result.

    A column is ``tool``'s when ``.uns[key_added]`` holds its parameters (``is_ours``); any
    other column (labels, sites, another tool's clusters) is the user's, and writing over it
    would lose it silently.

    Examples
    --------
    >>> from anndata import AnnData
    >>> import numpy as np, pandas as pd
    >>> adata = AnnData(np.zeros((2, 1)), obs=pd.DataFrame({"site": ["a", "b"]}, index=["0", "1"]))
    >>> check_obs_column_free(adata, "site", lambda entry: False, "scinfl.tl.cluster")
    Traceback (most recent call last):
    ...
    ValueError: adata.obs['site'] holds data that scinfl.tl.cluster did not write (labels, sites, another tool's result): pass another key_added=, or drop the column first (del adata.obs['site']).
    """
    if key_added in adata.obs.columns and not is_ours(adata.uns.get(key_added)):
        raise ValueError(
            f"adata.obs[{key_added!r}] holds data that {tool} did not write (labels, sites, "
            f"another tool's result): pass another key_added=, or drop the column first "
            f"(del adata.obs[{key_added!r}])."
        )
