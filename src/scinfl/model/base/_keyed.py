"""The secret key of a model: installed at run time, checked, never saved."""

from __future__ import annotations

import contextvars
import copy
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData

from scinfl._logging import quiet
from scinfl.key import MISSING_KEY_MESSAGE, Key, KeyMismatchError, MissingKeyError
from scinfl.model._multiomics_new_samples import aligned_new_mudata
from scinfl.model._validation import check_not_a_view
from scinfl.pp._features import align_features

logger = logging.getLogger(__name__)


class KeyedModelMixin:
    """Key handling for an scvi-tools model class whose module has keyed layers.

    The module must offer ``set_key(key)``, ``has_key`` and ``is_keyed`` (as
    :class:`~scinfl.module.KeyedVAE` does). The key is kept in memory only: it is no init
    parameter (so :meth:`save` never writes it) and lives in non-persistent buffers (so no
    ``state_dict`` or upload holds it). A model class calls :meth:`_init_key` at the end of
    its ``__init__``, after ``self.init_params_`` is set.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=10, n_sites=2)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site")
    >>> model = scinfl.model.INFL(adata)
    >>> model.has_key
    False
    >>> model.set_key(scinfl.Key.generate())
    >>> model.has_key
    True
    """

    key_fingerprint_: str | None = None
    key_version_: int | None = None
    _key: Key | None = None

    def _init_key(self, key: Key | None) -> None:
        """Drop the key from the saved init parameters, then install it (or say it is missing)."""
        self.init_params_["non_kwargs"].pop("key", None)
        if key is not None:
            self.set_key(key)
        elif self.module.is_keyed:
            logger.info(
                "%s created without a key; call `model.set_key(key)` before training.",
                type(self).__name__,
            )

    @property
    def has_key(self) -> bool:
        """Whether the federation's key is installed in this model."""
        return self._key is not None

    def set_key(self, key: Key, allow_mismatch: bool = False) -> None:
        """Install the federation's key (kept in memory only, never saved or shared).

        Parameters
        ----------
        key
            The key.
        allow_mismatch
            Accept a key other than the one this model was trained with (key rotation: then
            fine-tune with ``train_federated``). Otherwise a different key is refused.

        Examples
        --------
        >>> import scinfl
        >>> adata = scinfl.data.synthetic_counts(n_obs=40, n_vars=8, n_sites=2)
        >>> scinfl.model.INFL.setup_anndata(adata)
        >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
        >>> model.set_key(scinfl.Key.generate())
        Traceback (most recent call last):
        ...
        scinfl.key.KeyMismatchError: This model was trained with key ...
        >>> model.set_key(scinfl.Key.generate(), allow_mismatch=True)
        """
        if not isinstance(key, Key):
            raise TypeError(
                f"Expected a scinfl.Key, got {type(key).__name__}; load one with scinfl.Key.load(path)."
            )
        if not self.module.is_keyed:
            logger.info(
                "This model has key_mode=None: the key serves only secret frames and "
                "privacy='secagg'."
            )
        if (
            self.key_fingerprint_ is not None
            and key.fingerprint != self.key_fingerprint_
            and not allow_mismatch
        ):
            raise KeyMismatchError(
                f"This model was trained with key {self.key_fingerprint_} (version "
                f"{self.key_version_}); the key given is {key.fingerprint} (version {key.version}). "
                "Load the federation's key file, or pass allow_mismatch=True to rotate keys and "
                "fine-tune."
            )
        rotated = self.key_fingerprint_ is not None and key.fingerprint != self.key_fingerprint_
        self.module.set_key(key)
        self._key = key
        self.key_fingerprint_ = key.fingerprint
        self.key_version_ = key.version
        if rotated and self.module.is_keyed and getattr(self, "is_trained_", False):
            # the weights were trained under the old key: under this one they mean nothing yet
            self.is_trained_ = False
            logger.warning(
                "Key rotated: the weights were trained under another key, so the model's "
                "outputs mean nothing under this one until it is fine-tuned "
                "(train_federated); until then it counts as untrained."
            )

    def __getstate__(self) -> dict:
        """Pickled (``pickle``, ``joblib``, ``torch.save``) without the key, which stays in memory.

        The pickled model holds no key and its module no key material (its non-persistent key
        buffers are cleared in the pickled copy): set the key again after unpickling
        (:meth:`set_key`). A copy within this process (``copy.deepcopy``) keeps the key.

        Examples
        --------
        >>> import pickle, scinfl
        >>> adata = scinfl.data.synthetic_counts(n_obs=40, n_vars=8, n_sites=2)
        >>> scinfl.model.INFL.setup_anndata(adata)
        >>> key = scinfl.Key.generate()
        >>> model = scinfl.model.INFL(adata, key=key)
        >>> pickle.loads(pickle.dumps(model)).has_key
        False
        """
        state = self.__dict__.copy()
        if state.get("_key") is None and not getattr(self.module, "is_keyed", False):
            return state
        module = copy.deepcopy(self.module)
        module.set_key(None)
        state.update(_key=None, module=module)
        logger.info(
            "%s pickled without its key (it never leaves memory): call model.set_key(key) "
            "after unpickling.",
            type(self).__name__,
        )
        return state

    def __copy__(self):
        # a copy in this process keeps the key (pickling, which __getstate__ serves, does not)
        copied = type(self).__new__(type(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def __deepcopy__(self, memo: dict):
        # a copy in this process keeps the key (pickling, which __getstate__ serves, does not)
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    def _require_key(self) -> None:
        if self.module.is_keyed and not self.module.has_key:
            raise MissingKeyError(MISSING_KEY_MESSAGE)

    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save the model (never its key), all or nothing.

        scvi-tools' :meth:`~scvi.model.base.BaseModelClass.save`, written first to a hidden
        folder inside ``dir_path`` (on its file system) and moved into place when complete:
        an error or an interrupt part-way leaves what was there (a model saved before, or
        nothing) as it was. Without ``save_anndata``, a data file a model saved there before
        left is removed with it (``load`` would read it with this model).

        Parameters
        ----------
        dir_path
            Directory to save to (created, with its parents, if missing).
        prefix
            Prefix of the file names.
        overwrite
            Replace the files of a model saved in ``dir_path`` before.
        save_anndata
            Also save the AnnData (MuData).
        **kwargs
            Passed to scvi-tools' :meth:`scvi.model.base.BaseModelClass.save`:
            ``save_kwargs`` (for ``torch.save``), ``legacy_mudata_format``, and the data
            writer's arguments (e.g. ``compression="gzip"``, with ``save_anndata=True``).

        Examples
        --------
        >>> import os, scinfl, tempfile
        >>> adata = scinfl.data.synthetic_counts(n_obs=40, n_vars=8, n_sites=2)
        >>> scinfl.model.INFL.setup_anndata(adata)
        >>> path = os.path.join(tempfile.mkdtemp(), "model")
        >>> scinfl.model.INFL(adata, key_mode=None).save(path)
        >>> sorted(os.listdir(path))
        ['model.pt']
        """
        target = Path(dir_path).absolute()
        if target.exists() and not target.is_dir():
            raise ValueError(f"{dir_path} is a file; save to a directory.")
        if target.exists() and not overwrite:
            raise ValueError(
                f"{dir_path} already exists: pass overwrite=True to replace the model saved "
                "there, or save to another directory."
            )
        created = next((p for p in reversed(target.parents) if not p.exists()), None)
        created = created or (None if target.exists() else target)
        target.mkdir(parents=True, exist_ok=True)
        # staged inside the target, so on its file system (a mount, a link elsewhere) and
        # needing no right to write beside it; the files it replaces are kept until the end
        staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=target))
        try:
            super().save(
                str(staging / "new"),
                prefix=prefix,
                overwrite=True,
                save_anndata=save_anndata,
                **kwargs,
            )
            # a data file an earlier save left would be read with this model by load
            stale = [] if save_anndata else [f"{prefix or ''}{name}" for name in _DATA_FILES]
            _move_in(staging / "new", target, staging / "replaced", stale)
        except BaseException:
            shutil.rmtree(created if created is not None else staging, ignore_errors=True)
            raise
        shutil.rmtree(staging)

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | MuData | None = None,
        key: Key | None = None,
        allow_mismatch: bool = False,
        **kwargs: Any,
    ) -> Self:
        """Load a saved model; a keyed model needs the key it was trained with.

        Parameters
        ----------
        dir_path
            Directory written by ``save``.
        adata
            AnnData (a MuData for :class:`~scinfl.model.MultiOmicsINFL`) holding the
            features the model was trained on, matched by name (default: the data saved with
            ``save_anndata=True``).
        key
            The federation's key (saved models never contain it).
        allow_mismatch
            Accept a key other than the one the model was trained with: after a key rotation
            (:meth:`scinfl.Key.rotate`), load with the new key, then fine-tune with
            ``train_federated`` (:meth:`set_key`).
        **kwargs
            Passed to scvi-tools' :meth:`scvi.model.base.BaseModelClass.load`: ``prefix`` (as
            given to :meth:`save`), ``accelerator``, ``device``, ``backup_url``.

        Returns
        -------
        The model, of the class ``load`` is called on, with ``key`` installed.

        Examples
        --------
        >>> import scinfl, tempfile
        >>> adata = scinfl.data.synthetic_counts(n_obs=40, n_vars=8, n_sites=2)
        >>> scinfl.model.INFL.setup_anndata(adata)
        >>> key = scinfl.Key.generate()
        >>> scinfl.model.INFL(adata, key=key).save(path := tempfile.mkdtemp(), overwrite=True)
        >>> scinfl.model.INFL.load(path, adata, key=key).has_key
        True
        """
        if key is not None and not isinstance(key, Key):
            raise TypeError(
                f"key= takes a scinfl.Key, got {type(key).__name__}; load the federation's key "
                "file with key=scinfl.Key.load(path)."
            )
        if isinstance(adata, AnnData | MuData):
            check_not_a_view(adata)
            adata = _with_saved_features(dir_path, adata, kwargs.get("prefix"))
        # scvi-tools reports a local file as "already downloaded", and the model is built
        # without its key before the key below is set: neither is news to the user
        loading = LOADING_SAVED_MODEL.set(True)
        try:
            with quiet("scvi.data._download", __name__), _categories_fixed_by_the_model():
                model = super().load(str(dir_path), adata=adata, **kwargs)
        finally:
            LOADING_SAVED_MODEL.reset(loading)
        if model.module.is_keyed:
            if key is None:
                raise MissingKeyError(
                    f"The model in {dir_path} is keyed (key {model.key_fingerprint_}); pass "
                    "key=scinfl.Key.load(path) with the federation's key to load it."
                )
            rotated = key.fingerprint != model.key_fingerprint_
            if model.key_fingerprint_ is not None and rotated and not allow_mismatch:
                raise KeyMismatchError(
                    f"The model in {dir_path} was trained with key {model.key_fingerprint_}; the key "
                    f"given is {key.fingerprint}. Use the federation's key file; after a key "
                    "rotation, pass allow_mismatch=True and fine-tune with train_federated."
                )
        if key is not None:
            model.set_key(key, allow_mismatch=allow_mismatch)
        return model


#: the data files scvi-tools' ``save(save_anndata=True)`` writes (after the prefix)
#: ``True`` while :meth:`KeyedModelMixin.load` builds a saved model: a constructor may then
#: accept settings of an earlier version that it refuses for a new model
LOADING_SAVED_MODEL: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "scinfl_loading_saved_model", default=False
)
_DATA_FILES = ("adata.h5ad", "mdata.h5mu")


def _move_in(new: Path, target: Path, replaced: Path, stale: Sequence[str] = ()) -> None:
    """Move the files of ``new`` into ``target``, keeping those they replace in ``replaced``.

    Files of ``target`` named in ``stale`` are moved to ``replaced`` too. An error or an
    interrupt part-way puts every replaced file back and removes the new ones.
    """
    replaced.mkdir()
    moved = []
    try:
        for name in stale:
            if (target / name).exists():
                moved.append(name)
                os.replace(target / name, replaced / name)
        for item in sorted(new.iterdir()):
            destination = target / item.name
            if destination.exists():
                os.replace(destination, replaced / item.name)
            moved.append(item.name)
            os.replace(item, destination)
    except BaseException:
        for name in moved:
            if (replaced / name).exists():
                os.replace(replaced / name, target / name)
            else:
                (target / name).unlink(missing_ok=True)
        raise


@contextmanager
def _categories_fixed_by_the_model() -> Iterator[None]:
    """Rephrase scvi-tools' refusal of a category the saved model does not know.

    scvi-tools advises ``extend_categories=True``, which ``load`` does not take: a model has
    weights (a classifier output, a batch embedding) for its own categories only.
    """
    try:
        yield
    except ValueError as error:
        if "adata or registry must be provided" in str(error):
            raise ValueError(
                "The model was saved without its data: pass the data to load it onto, "
                "load(path, adata, key=...), or save it with save_anndata=True."
            ) from error
        if "not found in source registry" not in str(error):
            raise
        category = str(error).split(" not found")[0].removeprefix("Category ")
        raise ValueError(
            f"The data hold category {category} (of a label, batch or condition column) that "
            "the saved model was not built with: its categories are fixed with its weights. "
            "To embed or predict, load the model onto its own data and pass these as new "
            "samples (get_latent_representation, tl.embed, tl.predict read labels they never "
            "saw); to train on them, leave those rows out, or train a new model agreeing future "
            "categories up front (setup_anndata(..., categories=))."
        ) from error


def _with_saved_features(dir_path, adata: AnnData | MuData, prefix: str | None):
    """``adata`` with the saved model's features in its order (a copy when they differ).

    scvi-tools' ``load`` only warns when the features differ from the saved ones and then
    reads them by position: genes in another order would silently feed the wrong inputs. A
    MuData is matched modality by modality (features and samples by name), when the saved
    model lists its modalities' features (``modality_features_``).
    """
    saved = torch.load(
        Path(dir_path) / f"{prefix or ''}model.pt", map_location="cpu", weights_only=False
    )
    if isinstance(adata, MuData):
        attributes = saved.get("attr_dict", {})
        features = attributes.get("modality_features_")
        if not features or all(
            name in adata.mod
            and adata.mod[name].var_names.equals(pd.Index(names))
            and adata.mod[name].obs_names.equals(adata.obs_names)
            for name, names in features.items()
        ):
            return adata
        setup = attributes["registry_"]["setup_args"]
        likelihoods = attributes["init_params_"]["non_kwargs"]["likelihoods"]
        return aligned_new_mudata(adata, features, setup.get("layers") or {}, likelihoods)
    setup = saved.get("attr_dict", {}).get("registry_", {}).get("setup_args", {})
    site_key = setup.get("site_key")
    if site_key is not None and site_key not in adata.obs:
        raise ValueError(
            f"The AnnData lacks the site column {site_key!r} the model was set up with. New "
            "samples need none: load the model onto its training data (or without adata if it "
            "was saved with save_anndata=True) and pass them to get_latent_representation or "
            "scinfl.tl.embed; to train further, add the column."
        )
    names = pd.Index(np.asarray(saved.get("var_names", [])).astype(str))
    # compared as strings, as they were saved: var_names of integers are the same features
    if len(names) == 0 or adata.var_names.astype(str).equals(names):
        return adata
    missing = names[~names.isin(adata.var_names.astype(str))]
    if len(missing):
        raise ValueError(
            f"The AnnData lacks {len(missing)} of the saved model's {len(names)} features (e.g. "
            f"{list(missing[:5])}). Load the model with data that hold them (or without adata "
            "if it was saved with save_anndata=True), then pass these samples to "
            "get_latent_representation or scinfl.tl.embed, which match features by name."
        )
    logger.info(
        "Aligned the AnnData's %d features to the saved model's %d by name (a copy).",
        adata.n_vars,
        len(names),
    )
    return align_features(adata, names)
