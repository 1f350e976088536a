"""Which scinfl result holds which entry of an AnnData, so that one tool never writes over another's.

Each tool records its parameters in ``.uns[key]["params"]``; from them this module tells the
tool and the entries it wrote (its latent, probabilities, UMAP, neighbour graph). A tool about to
write an entry that another result holds refuses, naming it: the other result would otherwise
be lost without a word (probabilities over the latent, a latent over a UMAP).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from anndata import AnnData


def result_tool(entry) -> str | None:
    """The scinfl tool whose parameters an ``.uns`` entry records, or ``None``.

    Parameters
    ----------
    entry
        An ``.uns`` value.

    Returns
    -------
    ``"scinfl.tl.predict"``, ``"scinfl.tl.domains"``, ``"scinfl.tl.cluster"``,
    ``"scinfl.tl.embed"``, or ``None`` for anything else.

    Examples
    --------
    >>> result_tool({"params": {"proba_key": "scinfl_proba", "labels": ["a"]}})
    'scinfl.tl.predict'
    >>> result_tool({"connectivities_key": "x"}) is None
    True
    """
    params = entry.get("params") if isinstance(entry, Mapping) else None
    if not isinstance(params, Mapping):
        return None
    names = set(params)
    if {"proba_key", "labels"} <= names:
        return "scinfl.tl.predict"
    if {"n_layers", "method", "neighbors_key"} <= names:
        return "scinfl.tl.domains"
    if {"neighbors_key", "resolution"} <= names:
        return "scinfl.tl.cluster"
    if "model" in names:
        return "scinfl.tl.embed"
    return None


def _written(tool: str, key: str, params: Mapping) -> set[tuple[str, str]]:
    """The ``(slot, name)`` entries the result of ``tool`` recorded in ``.uns[key]`` wrote."""
    wrote = {("uns", key)}
    if tool == "scinfl.tl.embed":
        return wrote | {("obsm", key)}
    wrote.add(("obs", key))
    if tool == "scinfl.tl.predict":
        wrote.add(("obsm", str(params["proba_key"])))
    elif tool == "scinfl.tl.domains":
        wrote.add(("obsm", f"X_{key}"))
    else:
        wrote.add(("uns", str(params["neighbors_key"])))
        if "umap_key" in params:
            wrote.add(("obsm", str(params["umap_key"])))
    return wrote


def check_entries_free(adata: AnnData, entries: Iterable[tuple[str, str]], tool: str) -> None:
    """Refuse to write ``entries`` that another scinfl result holds.

    Parameters
    ----------
    adata
        The data written into.
    entries
        ``(slot, name)`` pairs the tool is about to write (``("obsm", "X_scinfl")``).
    tool
        The tool's name, for the message.

    Raises
    ------
    ValueError
        Naming the entry, the result that holds it and where that result is recorded.

    Examples
    --------
    >>> import numpy as np
    >>> adata = AnnData(np.zeros((2, 1)))
    >>> adata.obsm["X_scinfl"] = np.zeros((2, 10))  # as scinfl.tl.embed writes it
    >>> adata.uns["X_scinfl"] = {"params": {"model": "INFL"}}
    >>> check_entries_free(adata, [("obsm", "X_scinfl")], "scinfl.tl.predict")
    Traceback (most recent call last):
    ...
    ValueError: adata.obsm['X_scinfl'] holds the result of scinfl.tl.embed (recorded in adata.uns['X_scinfl']): scinfl.tl.predict would write over it. Pass another name for it.
    """
    wanted = set(entries)
    for key, entry in adata.uns.items():
        owner = result_tool(entry)
        if owner is None or owner == tool:
            # not a result, or the tool's own kind of entry: a rerun, or another result sharing
            # it (Leiden at another resolution on the same neighbour graph, as scanpy shares it)
            continue
        # only what is there: a record of parameters alone (another tool's, whose keys happen
        # to match) holds no entry
        wrote = _written(owner, str(key), entry["params"])
        held = {(slot, name) for slot, name in wrote if name in getattr(adata, slot)}
        for slot, name in sorted(wanted & held):
            raise ValueError(
                f"adata.{slot}[{name!r}] holds the result of {owner} (recorded in "
                f"adata.uns[{key!r}]): {tool} would write over it. Pass another name for it."
            )
