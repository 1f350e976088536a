"""INFL: a keyed VAE trained across sites that never share data or key."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scvi
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin, VAEMixin
from scvi.utils import setup_anndata_dsp

from scinfl.federated import FederationConfig, SiteData, run_local
from scinfl.key import Key, KeyMismatchError, MissingKeyError
from scinfl.module import KeyedVAE

from ._validation import (
    apply_agreed_categories,
    validate_layer,
    validate_matrix,
    validate_obs_column,
    validate_sites,
)

logger = logging.getLogger(__name__)

SITE_KEY = "site"


class INFL(VAEMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Federated VAE with a secret key embedded in its architecture (INFL).

    Each site trains on its own rows; only parameters travel, and the key (secret coordinates
    that condition the encoder's keyed layers) never does: it is in no ``state_dict``, saved
    model or upload. A latent space for clustering, and labels when ``labels_key`` is set.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    key
        The federation's :class:`~scinfl.Key`. Required before training or inference when
        ``key_mode`` is not ``None``.
    key_mode
        ``"pooled"`` (the paper's design) or ``None`` (plain federated model, no key).
    key_strength
        Strength ``lambda`` of the keyed modulation.
    gene_likelihood
        ``"nb"`` / ``"zinb"`` for counts; ``"normal"`` for continuous data (NaN = missing,
        masked out of the loss).
    n_hidden, n_latent, n_layers, dropout_rate
        Network sizes, as in scvi-tools.
    classification_ratio
        Weight of the classifier loss when ``labels_key`` was registered.
    **module_kwargs
        Passed to :class:`~scinfl.module.KeyedVAE`.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=300, n_vars=40, n_sites=3)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
    >>> history = model.train_federated(max_rounds=2, batch_size=32, progress_bar=False)
    >>> model.get_latent().shape
    (300, 10)
    """

    _module_cls = KeyedVAE

    def __init__(
        self,
        adata: AnnData,
        key: Key | None = None,
        key_mode: str | None = "pooled",
        key_strength: float = 1.0,
        gene_likelihood: Literal["nb", "zinb", "normal"] = "nb",
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        classification_ratio: float = 50.0,
        **module_kwargs,
    ) -> None:
        super().__init__(adata)
        layer = self.adata_manager.get_state_registry(REGISTRY_KEYS.X_KEY).get("layer")
        where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
        validate_matrix(
            self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY), gene_likelihood, where
        )
        labels_key = self.adata_manager.registry["setup_args"].get("labels_key")
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            n_batch=self.summary_stats.n_batch,
            n_labels=self.summary_stats.n_labels,
            gene_likelihood=gene_likelihood,
            key_mode=key_mode,
            key_strength=key_strength,
            classify=labels_key is not None,
            classification_ratio=classification_ratio,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            **module_kwargs,
        )
        self.key_fingerprint_: str | None = None
        self.key_version_: int | None = None
        self.federated_history_: pd.DataFrame | None = None
        self.dp_epsilon_: float | None = None
        self._model_summary_string = (
            f"INFL: key_mode={key_mode}, gene_likelihood={gene_likelihood}, n_latent={n_latent}, "
            f"n_hidden={n_hidden}, n_layers={n_layers}"
        )
        init_params = self._get_init_params(locals())
        init_params["non_kwargs"].pop("key", None)  # the key is passed at run time, never saved
        self.init_params_ = init_params
        if key is not None:
            self.set_key(key)
        elif key_mode is not None:
            logger.info("INFL created without a key; call `model.set_key(key)` before training.")

    # -- key -------------------------------------------------------------------------------
    def set_key(self, key: Key, allow_mismatch: bool = False) -> None:
        """Install the federation's key (kept in memory only, never saved or shared).

        Parameters
        ----------
        key
            The key.
        allow_mismatch
            Accept a key other than the one this model was trained with (key rotation: then
            fine-tune with :meth:`train_federated`). Otherwise a different key is refused.

        Examples
        --------
        >>> model.set_key(scinfl.Key.load("site.key"))  # doctest: +SKIP
        """
        if not isinstance(key, Key):
            raise TypeError(
                f"Expected a scinfl.Key, got {type(key).__name__}; load one with scinfl.Key.load(path)."
            )
        if not self.module.is_keyed:
            logger.info(
                "This model has key_mode=None: the key serves only secret_frames and "
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
        self.module.set_key(key)
        # kept in memory for secure aggregation's masks; never saved (not an init parameter)
        self._key = key
        self.key_fingerprint_ = key.fingerprint
        self.key_version_ = key.version

    def _require_key(self) -> None:
        if not self.module.has_key:
            raise MissingKeyError(
                "This model is keyed but has no key. Pass `key=` when creating or loading it, or call "
                "`model.set_key(scinfl.Key.load(path))`."
            )

    # -- setup -------------------------------------------------------------------------------
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        site_key: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categories: Mapping[str, Sequence[str]] | None = None,
        **kwargs,
    ) -> None:
        """Register an AnnData for INFL.

        Parameters
        ----------
        adata
            Observations x features; counts or continuous values.
        layer
            Layer with the data (``None``: ``adata.X``). Counts for ``nb``/``zinb``.
        site_key
            ``.obs`` column naming the site of each observation (required to federate; see
            :func:`scinfl.federated.partition` to simulate sites).
        batch_key
            ``.obs`` column of batches to correct for in the decoder.
        labels_key
            ``.obs`` column of labels; trains a classifier head and enables :meth:`predict`.
        categories
            Agreed categories by argument name, e.g. ``{"labels_key": [...]}``: fixes the
            category codes across sites that set up their data separately. Values outside the
            list are refused.
        **kwargs
            Passed to :class:`~scvi.data.AnnDataManager`.

        Examples
        --------
        >>> INFL.setup_anndata(adata, layer="counts", site_key="site", labels_key="cell_type")  # doctest: +SKIP
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        validate_layer(adata, layer)
        for argument, key in (
            ("site_key", site_key),
            ("batch_key", batch_key),
            ("labels_key", labels_key),
        ):
            validate_obs_column(adata, key, argument)
        for argument, cats in (categories or {}).items():
            if argument not in ("site_key", "batch_key", "labels_key"):
                raise ValueError(
                    f"categories= takes 'site_key', 'batch_key' or 'labels_key', got {argument!r}."
                )
            column = {"site_key": site_key, "batch_key": batch_key, "labels_key": labels_key}[
                argument
            ]
            apply_agreed_categories(adata, column, cats)
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            CategoricalObsField(SITE_KEY, site_key),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # -- federated training -------------------------------------------------------------------
    def _registered_codes(self, registry_key: str) -> np.ndarray:
        return (
            np.asarray(self.adata_manager.get_from_registry(registry_key)).ravel().astype(np.int64)
        )

    def _site_rows(self) -> dict[str, np.ndarray]:
        """Rows of each (non-empty) site, by site name, in the registry's site order."""
        codes = self._registered_codes(SITE_KEY)
        names = self.adata_manager.get_state_registry(SITE_KEY).categorical_mapping
        rows = {str(name): np.flatnonzero(codes == code) for code, name in enumerate(names)}
        return {name: r for name, r in rows.items() if len(r)}

    def _site_data(self, validation_size: float, seed: int) -> list[SiteData]:
        X = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        batch = self._registered_codes(REGISTRY_KEYS.BATCH_KEY)
        labels = self._registered_codes(REGISTRY_KEYS.LABELS_KEY)
        mapping = self.adata_manager.get_state_registry(SITE_KEY).categorical_mapping
        code_of = {str(name): code for code, name in enumerate(mapping)}
        sites = []
        for name, rows in self._site_rows().items():
            code = code_of[name]
            sites.append(
                SiteData.from_arrays(
                    name,
                    X[rows],
                    batch=batch[rows],
                    labels=labels[rows],
                    validation_size=validation_size,
                    seed=int(np.random.SeedSequence([seed, code]).generate_state(1)[0]),
                )
            )
        return sites

    def train_federated(
        self,
        max_rounds: int = 50,
        local_epochs: int = 1,
        fraction: float = 1.0,
        engine: Literal["local", "flower"] = "local",
        strategy: Literal["fedavg", "fedprox"] = "fedavg",
        mu: float = 0.01,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        kl_warmup_rounds: int | None = None,
        balance_classes: bool = False,
        validation_size: float = 0.1,
        early_stopping: bool = False,
        early_stopping_patience: int = 10,
        min_cells_per_site: int = 10,
        min_available: int = 1,
        privacy: Literal["dp", "secagg"] | None = None,
        dp_noise_multiplier: float = 1.0,
        dp_clipping_norm: float = 1.0,
        dp_delta: float = 1e-5,
        secret_frames: bool | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        seed: int | None = None,
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Train across the sites of ``.obs[site_key]``; each site sees only its own rows.

        Every round a fraction of sites trains ``local_epochs`` from the global weights, sends
        back its shared parameters and ``n_k`` (never the key), and the server averages them
        (FedAvg weighted by ``n_k``; FedProx adds ``mu/2 ||w - w_global||^2`` to each site's
        loss). The KL weight follows the global round. The global model with the lowest
        validation loss (each site's held-out rows) is kept.

        Parameters
        ----------
        max_rounds
            Number of communication rounds.
        local_epochs
            Local epochs per round.
        fraction
            Fraction of sites sampled each round.
        engine
            ``"local"``: all sites in this process, in turn. ``"flower"``: the same federation
            through Flower's simulation engine (one virtual node per site; needs the
            ``flower`` extra); it gives the same global weights as ``"local"``.
        strategy
            ``"fedavg"`` or ``"fedprox"``.
        mu
            FedProx proximal weight (used with ``strategy="fedprox"``).
        batch_size, lr, weight_decay
            Local optimisation (Adam).
        kl_warmup_rounds
            Rounds of linear KL warm-up (default: half of ``max_rounds``).
        balance_classes
            With labels, weight each site's classification loss by the inverse frequency of
            the labels among its own rows (for imbalanced classes).
        validation_size
            Fraction of each site's rows held out for validation and model selection.
        early_stopping, early_stopping_patience
            Stop when the validation loss has not improved for that many rounds.
        min_cells_per_site
            Smallest site accepted.
        min_available
            Fewest accepted site updates a round needs. Sites that fail (or, on Flower, do not
            answer in time) are left out of that round; below ``min_available`` the run stops
            with an error and can be continued with ``resume=True``.
        privacy
            ``"dp"``: client-level DP-FedAvg with fixed clipping, Flower's mechanism and
            Rényi-DP accountant (needs the ``flower`` extra). Each site's update is clipped to
            ``dp_clipping_norm``, updates are averaged uniformly and Gaussian noise of standard
            deviation ``dp_noise_multiplier * dp_clipping_norm / n_sampled`` is added. The
            epsilon spent (at ``dp_delta``) is in the history's ``dp_epsilon`` column and in
            ``model.dp_epsilon_``. ``"secagg"``: secure aggregation with the federation's key
            (:func:`~scinfl.federated.mask_update`): each site masks its update with pairwise
            masks derived from the key, so the server learns only the sum of the updates, not
            any one site's; the model is the same as without it (up to a fixed-point
            resolution of 6e-8). Needs a key (any ``key_mode``, ``None`` included).
        dp_noise_multiplier, dp_clipping_norm, dp_delta
            DP settings (used with ``privacy="dp"``).
        secret_frames
            The server holds and averages the model only in secret frames drawn from the key,
            a new one every round (:class:`~scinfl.federated.SecretFrames`): every parameter
            tensor travels as ``A^T W B`` with secret invertible ``A``, ``B``. FedAvg commutes
            with these maps, so the model is the same as without them (up to float rounding),
            but no upload and no global model the server sees is in the coordinates the model
            computes with (``docs/privacy.md``: without them, a site's upload gives its rows
            back to the server, whatever the key mode). Default (``None``): on whenever the
            model holds a key (any ``key_mode``, ``None`` included), except with
            ``privacy="dp"``, which needs updates in a common frame. They cost time on wide
            models (about 1.2x on 1,000 genes, 4.5x on 9,367 proteins with few rows per site;
            ``benchmarks/results/secret_frames_cost.md``): pass ``False`` to simulate without
            them when no one else sees the parameters. ``True`` without a key is an error.
        checkpoint_dir
            Write the server's state (global and selected weights, round, history, DP
            accounting; never the key or data) there after every completed round.
        resume
            Continue the interrupted run saved in ``checkpoint_dir`` from its last completed
            round, with the same settings (``max_rounds`` may grow); the result equals that of
            an uninterrupted run.
        seed
            Seed of the federation (default: ``scvi.settings.seed``).
        progress_bar
            Show a progress bar over rounds.

        Returns
        -------
        History: one row per round and site (``n_train``, training and validation losses,
        accuracies with labels, time). Also stored in ``model.federated_history_``.

        Examples
        --------
        >>> history = model.train_federated(max_rounds=30, local_epochs=2)  # doctest: +SKIP
        >>> model.train_federated(max_rounds=30, checkpoint_dir="ckpt/")  # doctest: +SKIP
        >>> model.train_federated(max_rounds=30, checkpoint_dir="ckpt/", resume=True)  # doctest: +SKIP
        >>> model.train_federated(max_rounds=30, privacy="dp", dp_noise_multiplier=0.5)  # doctest: +SKIP
        >>> model.train_federated(max_rounds=30, privacy="secagg")  # doctest: +SKIP
        >>> model.train_federated(max_rounds=30, secret_frames=False)  # doctest: +SKIP
        """
        if engine not in ("local", "flower"):
            raise ValueError(f"Unknown engine {engine!r}; available: 'local', 'flower'.")
        if secret_frames is None:
            secret_frames = getattr(self, "_key", None) is not None and privacy != "dp"
        if strategy not in ("fedavg", "fedprox"):
            raise ValueError(f"strategy must be 'fedavg' or 'fedprox', got {strategy!r}.")
        if self.adata_manager.registry["setup_args"].get("site_key") is None:
            raise ValueError(
                "No site_key was registered: pass site_key= to INFL.setup_anndata, or simulate "
                "sites with scinfl.federated.partition(adata, n_sites=3) first."
            )
        config = self._federation_config(
            max_rounds=max_rounds,
            local_epochs=local_epochs,
            fraction=fraction,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            mu=mu if strategy == "fedprox" else 0.0,
            kl_warmup_rounds=kl_warmup_rounds,
            balance_classes=balance_classes,
            early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            seed=seed,
            min_available=min_available,
            privacy=privacy,
            dp_noise_multiplier=dp_noise_multiplier,
            dp_clipping_norm=dp_clipping_norm,
            dp_delta=dp_delta,
            secret_frames=secret_frames,
        )
        if (secret_frames or privacy == "secagg") and getattr(self, "_key", None) is None:
            what = "secret_frames=True" if secret_frames else "privacy='secagg'"
            raise ValueError(
                f"{what} derives its secrets (frames, masks) from the federation's key: create "
                "the model with key=scinfl.Key.generate() (or call model.set_key(key)) first."
            )
        sites = self._site_data(validation_size, config.seed)
        validate_sites(
            [s.name for s in sites],
            {s.name: s.n_train for s in sites},
            batch_size=batch_size,
            min_cells=min_cells_per_site,
        )
        if min_available > len(sites):
            raise ValueError(
                f"min_available={min_available} but the federation has only {len(sites)} sites."
            )
        history = self._run(
            sites,
            config,
            progress_bar,
            engine=engine,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
        )
        self._record_split(sites, self._site_rows())
        return history

    def train_centralized(
        self,
        max_epochs: int = 50,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        kl_warmup_epochs: int | None = None,
        balance_classes: bool = False,
        validation_size: float = 0.1,
        early_stopping: bool = False,
        early_stopping_patience: int = 10,
        seed: int | None = None,
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Train the same model on all rows pooled, as one site: the centralized reference.

        Same optimiser, minibatching, KL schedule and model selection as
        :meth:`train_federated`, so the two differ only in where the data sit. (scvi-tools'
        :meth:`train` also works on this model and uses Lightning.)

        Examples
        --------
        >>> model.train_centralized(max_epochs=30)  # doctest: +SKIP
        """
        config = self._federation_config(
            max_rounds=max_epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            kl_warmup_rounds=kl_warmup_epochs,
            balance_classes=balance_classes,
            early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            seed=seed,
        )
        site = SiteData.from_arrays(
            "all",
            self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY),
            batch=self._registered_codes(REGISTRY_KEYS.BATCH_KEY),
            labels=self._registered_codes(REGISTRY_KEYS.LABELS_KEY),
            validation_size=validation_size,
            seed=config.seed,
        )
        validate_sites(["all"], {"all": site.n_train}, batch_size=batch_size, min_cells=2)
        history = self._run([site], config, progress_bar)
        self._record_split([site], {"all": np.arange(self.adata.n_obs)})
        return history

    def _record_split(self, sites: list[SiteData], rows: dict[str, np.ndarray]) -> None:
        # scvi-tools' train_indices / validation_indices: the rows each site trained on and
        # held out (the members of a membership-inference audit)
        self.train_indices_ = np.sort(np.concatenate([rows[s.name][s.train_idx] for s in sites]))
        self.validation_indices_ = np.sort(np.concatenate([rows[s.name][s.val_idx] for s in sites]))

    def _federation_config(self, seed: int | None, **kwargs) -> FederationConfig:
        self._require_key()
        seed = scvi.settings.seed if seed is None else seed
        return FederationConfig(seed=0 if seed is None else int(seed), **kwargs)

    def _run(
        self,
        sites: list[SiteData],
        config: FederationConfig,
        progress_bar: bool,
        engine: str = "local",
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
    ) -> pd.DataFrame:
        torch.manual_seed(config.seed)
        runner = run_local
        if engine == "flower":
            try:
                from scinfl.federated.flower import run_flower_simulation as runner
            except ImportError as err:
                raise ImportError(
                    "engine='flower' needs Flower: install the extra with `pip install 'scinfl[flower]'`."
                ) from err
        server = runner(
            self.module,
            sites,
            config,
            key_fingerprint=self.key_fingerprint_,
            key_version=self.key_version_,
            progress_bar=progress_bar,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            key=getattr(self, "_key", None),
        )
        self.module.eval()
        self.is_trained_ = True
        history = server.history()
        history.attrs["best_round"] = server.best_round
        self.federated_history_ = history
        self.dp_epsilon_ = server.dp_epsilon()
        # the frame the server holds the selected model in (secret_frames), for the audit
        self.secret_frame_ = server.best_frame
        return history

    # -- outputs -------------------------------------------------------------------------------
    def get_latent_representation(self, *args, **kwargs) -> np.ndarray:
        """Latent representation of each observation (mean of q(z|x) by default).

        Parameters are those of :meth:`scvi.model.base.VAEMixin.get_latent_representation`.

        Examples
        --------
        >>> adata.obsm["X_scinfl"] = model.get_latent_representation()  # doctest: +SKIP
        """
        self._require_key()
        return super().get_latent_representation(*args, **kwargs)

    def get_latent(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Latent means, shape ``(n_obs, n_latent)``: what to store in ``.obsm["X_scinfl"]``.

        Examples
        --------
        >>> adata.obsm["X_scinfl"] = model.get_latent()  # doctest: +SKIP
        """
        return self.get_latent_representation(adata=adata, indices=indices, batch_size=batch_size)

    @torch.inference_mode()
    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Predict labels with the classifier head (needs ``labels_key`` at setup).

        Parameters
        ----------
        adata, indices, batch_size
            Data to predict on (default: the registered AnnData).
        soft
            Return class probabilities as a DataFrame instead of label names.

        Examples
        --------
        >>> adata.obs["scinfl_prediction"] = model.predict()  # doctest: +SKIP
        """
        if self.module.classifier is None:
            raise ValueError(
                "This model has no classifier: pass labels_key= to INFL.setup_anndata."
            )
        self._require_key()
        adata = self._validate_anndata(adata)
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
        self.module.eval()
        probs = []
        for tensors in loader:
            inference_inputs = self.module._get_inference_input(tensors)
            qz = self.module.inference(**inference_inputs)["qz"]
            probs.append(torch.softmax(self.module.classification_logits(qz.loc), dim=-1).cpu())
        probs = torch.cat(probs).numpy()
        categories = self.adata_manager.get_state_registry(
            REGISTRY_KEYS.LABELS_KEY
        ).categorical_mapping
        obs_names = adata.obs_names if indices is None else adata.obs_names[np.asarray(indices)]
        if soft:
            return pd.DataFrame(probs, index=obs_names, columns=list(categories))
        return np.asarray(categories)[probs.argmax(1)]

    # -- save / load -------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | None = None,
        key: Key | None = None,
        **kwargs,
    ) -> INFL:
        """Load a saved model; a keyed model needs the key it was trained with.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            AnnData set up like the training data.
        key
            The federation's key (saved models never contain it).
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load`.

        Examples
        --------
        >>> model = INFL.load("model/", adata, key=scinfl.Key.load("site.key"))  # doctest: +SKIP
        """
        model = super().load(str(dir_path), adata=adata, **kwargs)
        if model.module.is_keyed:
            if key is None:
                raise MissingKeyError(
                    f"The model in {dir_path} is keyed (key {model.key_fingerprint_}); pass "
                    "key=scinfl.Key.load(path) with the federation's key to load it."
                )
            if model.key_fingerprint_ is not None and key.fingerprint != model.key_fingerprint_:
                raise KeyMismatchError(
                    f"The model in {dir_path} was trained with key {model.key_fingerprint_}; the key "
                    f"given is {key.fingerprint}. Use the federation's key file."
                )
            model.set_key(key)
        return model
