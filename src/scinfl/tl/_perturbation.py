"""Write a model's predicted perturbation response as a new AnnData."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

if TYPE_CHECKING:
    from scinfl.model import PerturbationINFL


def predict_perturbation(
    adata: AnnData,
    model: PerturbationINFL,
    source: str = "ctrl",
    target: str = "stim",
    cell_type_key: str = "cell_type",
    cell_types: Sequence[str] | None = None,
    method: str = "decoder",
    output: str = "log_change",
    library_size: float = 1e4,
    seed: int = 0,
    key_added: str = "scinfl_perturbation",
    batch_size: int | None = None,
) -> AnnData:
    """Predict how the ``source`` cells of ``adata`` respond to ``target``; a new AnnData.

    One predicted cell per source cell of the chosen cell types
    (:meth:`~scinfl.model.PerturbationINFL.predict_perturbation`), named
    ``"<source cell>-<target>-predicted"``, with the source cell's ``.obs`` and the condition
    column set to ``target`` (its categories the model's levels), and ``adata``'s ``.var``:
    ready to concatenate with the observed cells, normalised like them. ``adata`` may hold
    the source cells only.

    Parameters
    ----------
    adata
        AnnData set up like the model's training data.
    model
        A trained :class:`~scinfl.model.PerturbationINFL`, its key set.
    source, target
        Condition levels (of the model's ``condition_key``).
    cell_type_key
        ``.obs`` column of cell types.
    cell_types
        Types to predict (default: every type with source cells).
    method
        ``"decoder"``, ``"latent"`` or ``"both"``, see
        :meth:`~scinfl.model.PerturbationINFL.predict_perturbation`.
    output
        What ``X`` holds: ``"log_change"`` (default), log-normalised values
        (``log1p(library_size * x / total)`` of the source cell plus the model's predicted
        change), comparable with ``sc.pp.normalize_total(target_sum=library_size)`` and
        ``sc.pp.log1p`` of observed cells (below 0 where a predicted decrease exceeds the
        cell's own level); ``"expected"``, the decoded expression scaled to
        ``library_size``; ``"counts"``, counts drawn at each source cell's library size (CSR,
        also in ``.layers["counts"]``).
    library_size
        Counts per cell that the normalised values refer to.
    seed
        Seed of the draws (``"counts"``).
    key_added
        ``.uns`` key of the parameters (``.uns[key_added]["params"]``).
    batch_size
        Cells per minibatch when encoding and decoding (``None``: scvi-tools' default).

    Returns
    -------
    Predicted cells x the model's genes.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_perturbation(n_obs=200, n_vars=24)
    >>> scinfl.model.PerturbationINFL.setup_anndata(
    ...     adata, condition_key="condition", site_key="site"
    ... )
    >>> model = scinfl.model.PerturbationINFL(adata, key=scinfl.Key.generate(), n_hidden=16)
    >>> _ = model.train_federated(max_rounds=1, batch_size=32, progress_bar=False, seed=0)
    >>> pred = scinfl.tl.predict_perturbation(adata, model, cell_types=["type1"])
    >>> pred.obs["condition"].unique().tolist(), pred.uns["scinfl_perturbation"]["params"]["source"]
    (['stim'], 'ctrl')
    """
    if not callable(getattr(model, "predict_perturbation", None)):
        raise TypeError(
            f"predict_perturbation needs a scinfl.model.PerturbationINFL (its decoder reads the "
            f"condition), got {type(model).__name__}."
        )
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(
            f"key_added must name the .uns entry of the parameters, got {key_added!r}."
        )
    expression = model.predict_perturbation(
        adata,
        source=source,
        target=target,
        cell_type_key=cell_type_key,
        cell_types=cell_types,
        method=method,
        output=output,
        library_size=library_size,
        seed=seed,
        batch_size=batch_size,
    )
    obs = adata.obs.loc[expression.index]
    obs = obs.loc[:, ~obs.columns.str.startswith("_scvi")].copy()  # scvi-tools' bookkeeping
    condition_key = model.condition_key
    # the model's levels (the data may hold only the source's), as the column holds them:
    # target=0 and target="0" name the same level
    levels = pd.Index(model.condition_levels)
    level = levels[[str(value) for value in levels].index(str(target))]
    obs[condition_key] = pd.Categorical([level] * len(obs), categories=levels)
    for column in obs.columns:
        if isinstance(obs[column].dtype, pd.CategoricalDtype) and column != condition_key:
            obs[column] = obs[column].cat.remove_unused_categories()
    # named by the target too: predictions for several targets concatenate
    obs.index = [f"{name}-{target}-predicted" for name in expression.index]
    x = expression.to_numpy(dtype=np.float32)
    # the model's genes, in its order (the data's may be another order or a superset)
    genes = pd.Index(expression.columns, name=adata.var_names.name)
    var = adata.var.set_axis(adata.var_names.astype(str)).reindex(genes.astype(str))
    result = AnnData(
        X=sparse.csr_matrix(x) if output == "counts" else x, obs=obs, var=var.set_axis(genes)
    )
    if output == "counts":
        result.layers["counts"] = result.X.copy()  # where scinfl models read counts from
    result.uns[key_added] = {
        "params": {
            "source": source,
            "target": target,
            "condition_key": condition_key,
            "cell_type_key": cell_type_key,
            # as .obs names them (cell types coded as numbers stay numbers), in their order
            "cell_types": _present_values(obs[cell_type_key]),
            "method": method,
            "output": output,
            "library_size": library_size,
            "seed": seed,
        }
    }
    return result


def _present_values(column: pd.Series) -> list:
    """The values a column holds, in its categories' order (sorted for a plain column)."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return [value for value in column.cat.categories if (column == value).any()]
    values = column.dropna().unique().tolist()
    try:
        return sorted(values)
    except TypeError:  # numbers and names mixed
        return sorted(values, key=str)
