"""Data folders that registry packages ship, found without importing the packages."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Sequence
from pathlib import Path


def installed_data_dir(package: str, data_dir: str, files: Sequence[str]) -> Path | None:
    """The folder ``data_dir`` of an installed ``package`` that holds every one of ``files``.

    Looks where the distribution's record and the import system place it; importing the package
    itself (slow, with dependencies the data do not need) is never necessary.

    Examples
    --------
    >>> installed_data_dir("no-such-package", "data", ["a.csv"]) is None
    True
    """
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        candidates.append(Path(str(dist.locate_file(f"{package}/{data_dir}"))))
        for file in dist.files or ():
            if file.name == files[0] and data_dir in file.parts:
                candidates.append(Path(str(file.locate())).parent)
                break
    try:
        # find_spec on a top-level name does not execute the package
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(loc) / data_dir for loc in spec.submodule_search_locations)
    for candidate in candidates:
        if all((candidate / name).is_file() for name in files):
            return candidate
    return None


def installed_version(package: str) -> str | None:
    """The installed version of ``package``, or ``None`` when it is not installed.

    Examples
    --------
    >>> installed_version("no-such-package") is None
    True
    """
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
