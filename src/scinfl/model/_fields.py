"""Registry fields: scvi-tools' fields where their category transfer reads codes, not names."""

from __future__ import annotations

from pandas.api.types import CategoricalDtype
from scvi.data._utils import _make_column_categorical
from scvi.data.fields import CategoricalJointObsField


class NamedCategoricalJointObsField(CategoricalJointObsField):
    """scvi-tools' joint categorical ``.obs`` field, with categories matched by name on transfer.

    scvi-tools' field casts a new AnnData's column to the registered categories with an
    *unordered* dtype; pandas counts two unordered dtypes with the same categories as equal,
    so a column holding the same categories in another order keeps its own codes, and a model
    would read every ``"stim"`` cell of new data as ``"ctrl"``. As scvi-tools' single
    categorical field (:class:`~scvi.data.fields.CategoricalObsField`) does, the cast here is
    to an *ordered* dtype, which recodes by name. Registration is unchanged.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from anndata import AnnData
    >>> field = NamedCategoricalJointObsField("extra_categorical_covs", ["condition"])
    >>> train = AnnData(obs=pd.DataFrame({"condition": pd.Categorical(["ctrl", "stim", "ctrl"])}))
    >>> state = field.register_field(train)
    >>> new = AnnData(obs=train.obs.copy())
    >>> new.obs["condition"] = new.obs["condition"].cat.reorder_categories(["stim", "ctrl"])
    >>> _ = field.transfer_field(state, new)
    >>> np.asarray(field.get_field_data(new)).ravel().tolist()
    [0, 1, 0]
    """

    def _make_array_categorical(self, adata, category_dict=None) -> dict:
        if category_dict is None:
            return super()._make_array_categorical(adata)
        frame = getattr(adata, self.attr_name)[self.attr_key]
        for key in self.attr_keys:
            _make_column_categorical(
                frame, key, key, CategoricalDtype(categories=category_dict[key], ordered=True)
            )
        mappings = self._default_mappings_dict()
        mappings[self.MAPPINGS_KEY] = category_dict
        mappings[self.FIELD_KEYS_KEY] = self.attr_keys
        mappings[self.N_CATS_PER_KEY] = [len(category_dict[key]) for key in self.attr_keys]
        return mappings
