"""Federated and centralized training for any scvi-tools model class with a keyed module."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scvi
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.model._utils import parse_device_args

from scinfl._random import forked_rng
from scinfl.federated import FederationConfig, SiteData, run_local
from scinfl.federated._dp import dp_fedavg_epsilon
from scinfl.model._validation import validate_sites
from scinfl.module import feature_moments, scale_from_moments

logger = logging.getLogger(__name__)

#: Setup argument that names the ``.obs`` column of sites. The site partitions training; it is
#: not registered as a model input, so new samples need no site column.
SITE_KEY = "site_key"


class FederatedTrainingMixin:
    """``train_federated`` and ``train_centralized`` for a model class with a keyed module.

    The model class registers its fields with an ``AnnDataManager`` as scvi-tools models do,
    plus a ``site_key`` setup argument; every registered field reaches each site's data
    (:meth:`~scinfl.federated.SiteData.from_registry`), so a model that registers a
    covariate, an ``.obsm`` array or a MuData modality trains federated with it and nothing
    else to write. The module must follow scvi-tools' ``BaseModuleClass`` contract (``forward``
    returning a ``LossOutput``). Used with :class:`KeyedModelMixin`.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=120, n_vars=12, n_sites=3)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=16)
    >>> history = model.train_federated(max_rounds=2, progress_bar=False)
    >>> sorted(history["site"].unique())
    ['site0', 'site1', 'site2']
    """

    def _site_rows(self) -> dict[str, np.ndarray]:
        """Row positions of each non-empty site, by name (in the column's category order)."""
        column = self.adata_manager.registry["setup_args"].get(SITE_KEY)
        if column is None:
            raise ValueError(
                f"No site_key was registered: pass site_key= to {type(self).__name__}.setup_anndata, "
                "or simulate sites with scinfl.federated.partition(adata, n_sites=3) first."
            )
        if column not in self.adata.obs:
            raise ValueError(
                f"adata.obs has no column {column!r} (the site_key given at setup): training "
                "needs each row's site."
            )
        sites = pd.Categorical(self.adata.obs[column])
        if sites.isna().any():
            raise ValueError(f"adata.obs[{column!r}] has missing values: give every row a site.")
        codes = sites.codes
        rows = {str(name): np.flatnonzero(codes == i) for i, name in enumerate(sites.categories)}
        return {name: r for name, r in rows.items() if len(r)}

    def _revalidate_setup(self) -> None:
        """Re-register this model's setup on its AnnData before reading the registry.

        Another ``setup_anndata`` (or ``load``) on the same AnnData rewrites the columns
        scvi-tools reads (its label and batch codes): training would read the other setup's
        labels. scvi-tools' ``validate`` re-registers this model's own setup. Features changed
        in place since setup (subset or reordered) are refused: the weights are per feature.
        """
        changed = self._features_changed_since_setup()
        if changed:
            raise ValueError(
                f"The data's features changed since setup ({changed}): this model's "
                "weights are per feature of its setup. Train a new model on the new features "
                "(set it up again), or restore them."
            )
        self.adata_manager.validate()

    def _features_changed_since_setup(self) -> str | None:
        """How the registered data's features changed in place since setup, or ``None``."""
        return registered_features_changed(self.adata_manager, self.adata)

    def _site_data(self, validation_size: float, seed: int) -> list[SiteData]:
        """Every site's data from the registry, split by ``seed`` and each site's name."""
        self._revalidate_setup()
        return [
            SiteData.from_registry(self.adata_manager, name, rows, validation_size, seed)
            for name, rows in self._site_rows().items()
        ]

    def _federation_config(self, seed: int | None = None, **settings) -> FederationConfig:
        self._require_key()
        seed = scvi.settings.seed if seed is None else seed
        config = FederationConfig.from_settings(seed=0 if seed is None else int(seed), **settings)
        unused = config.privacy.unused_settings()
        if unused:
            logger.warning("%s given without privacy='dp': no effect.", ", ".join(unused))
        return config.for_key(self.has_key)

    def train_federated(
        self,
        max_rounds: int = 50,
        local_epochs: int = 1,
        engine: Literal["local", "flower"] = "local",
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        progress_bar: bool = True,
        accelerator: str = "auto",
        devices: int | str = "auto",
        **settings: Any,
    ) -> pd.DataFrame:
        """Train across the sites of ``.obs[site_key]``; each site sees only its own rows.

        Every round a fraction of sites trains ``local_epochs`` from the global weights, sends
        back its shared parameters and ``n_k`` (never the key), and the server averages them
        (FedAvg weighted by ``n_k``, or FedProx). The KL weight follows the global round. The
        global model with the lowest validation loss (each site's held-out rows) is kept.
        With a key, the parameters travel in secret frames by default.

        Parameters
        ----------
        max_rounds
            Number of communication rounds.
        local_epochs
            Local epochs per round.
        engine
            ``"local"``: all sites in this process, in turn. ``"flower"``: the same federation
            through Flower's simulation engine (one virtual node per site; needs the
            ``flower`` extra); it gives the same global weights as ``"local"``.
        checkpoint_dir
            Write the server's state (global and selected weights, round, history, DP
            accounting; never the key or data) there after every completed round.
        resume
            Continue the interrupted run saved in ``checkpoint_dir`` from its last completed
            round, with the same settings; the result equals that of an uninterrupted run,
            except under DP (``sample_dp_epsilon``, ``privacy="dp"``): the noise comes from a
            secret of the process that draws it (a site's, the server's), so a restarted run
            draws new noise, and the model differs as another draw of the same mechanism does.
            ``max_rounds`` may grow: the run goes on with the KL warm-up it began with (by
            default half of the first call's ``max_rounds``, where an uninterrupted longer run
            warms up longer; give ``kl_warmup_rounds`` for runs you may extend).
        progress_bar
            Show a progress bar over rounds.
        accelerator, devices
            Where the sites train, as in scvi-tools' ``train``: ``"auto"`` takes a GPU when
            there is one, ``"cpu"``, ``"gpu"``; ``devices`` picks one device (an index, or
            ``"auto"``). The local engine plays every site on that device (the data stay in host
            memory and travel a minibatch at a time); the Flower engine trains on CPU.
        **settings
            Any setting of :class:`~scinfl.federated.FederationConfig`, by its flat name
            (:meth:`~scinfl.federated.FederationConfig.setting_defaults` lists them with their
            defaults; each is documented in the Parameters of ``FederationConfig`` and
            ``PrivacyConfig``): ``batch_size``, ``lr``, ``weight_decay``, ``fraction``,
            ``min_sites``, ``strategy``/``mu``, ``kl_warmup_rounds``, ``balance_classes``,
            ``validation_size``, ``min_cells_per_site``,
            ``early_stopping``/``early_stopping_patience``, ``min_available``, ``seed``
            (default: ``scvi.settings.seed``; it seeds the run, while the initial weights were
            drawn when the model was built: set ``scvi.settings.seed`` before building it for
            a model that repeats exactly); and the privacy part
            (:class:`~scinfl.federated.PrivacyConfig`): ``privacy`` (``"dp"``, ``"secagg"``,
            or a whole ``PrivacyConfig``), ``dp_noise_multiplier``, ``dp_clipping_norm``,
            ``dp_delta``, ``sample_dp_epsilon``/``sample_dp_clipping_norm`` (DP-SGD at every
            site: a formal guarantee per row, whatever the server does), ``secret_frames``,
            ``secagg_min_participants``. Another name raises ``TypeError``.

        Returns
        -------
        History: one row per round and site (``n_train``; ``trained``: whether the site trained
        that round, ``False`` for a site not sampled that only validated; ``accepted``: whether
        its update was averaged; training and validation losses; with labels, accuracies and
        classification losses over the labelled rows, whose number is ``train_labelled`` /
        ``val_labelled``; time; under ``sample_dp_epsilon`` each site's ``dp_epsilon`` spent
        instead of losses). Also stored in ``model.federated_history_``; ``model.history``
        holds the per-round losses (and the classifier's accuracies) under scvi-tools' names
        (:func:`scvi_history`).

        Examples
        --------
        >>> import scinfl
        >>> adata = scinfl.data.synthetic_counts(n_obs=120, n_vars=12, n_sites=3)
        >>> scinfl.model.INFL.setup_anndata(adata, site_key="site")
        >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=16)
        >>> history = model.train_federated(max_rounds=2, batch_size=32, progress_bar=False)
        >>> int(history["round"].max())
        1
        >>> _ = model.train_federated(max_rounds=1, strategy="fedprox", mu=0.1, progress_bar=False)
        """
        if engine not in ("local", "flower"):
            raise ValueError(f"Unknown engine {engine!r}; available: 'local', 'flower'.")
        check_setting_names(
            "train_federated",
            settings,
            _FEDERATED_ARGUMENTS,
            {"max_epochs": "max_rounds", "n_epochs_kl_warmup": "kl_warmup_rounds"},
        )
        check_progress_bar(progress_bar)
        config = self._federation_config(
            max_rounds=max_rounds, local_epochs=local_epochs, **settings
        )
        sites = self._site_data(config.validation_size, config.seed)
        validate_sites(
            {s.name: s.n_train + s.n_val for s in sites},
            {s.name: s.n_train for s in sites},
            batch_size=config.batch_size,
            min_cells=config.min_cells_per_site,
        )
        if config.min_sites > len(sites):
            raise ValueError(
                f"min_sites={config.min_sites} but the federation has only {len(sites)} sites."
            )
        if config.min_available > len(sites):
            raise ValueError(
                f"min_available={config.min_available} but the federation has only "
                f"{len(sites)} sites."
            )
        sampled = config.sites_per_round(len(sites))
        if config.min_available > sampled:
            raise ValueError(
                f"min_available={config.min_available} but fraction={config.fraction} asks "
                f"{sampled} of the {len(sites)} sites to train each round: no round could "
                f"complete. Raise fraction (or min_sites), or lower min_available."
            )
        participants = config.privacy.secagg_min_participants
        if config.privacy.secure_aggregation and participants and participants > sampled:
            raise ValueError(
                f"secagg_min_participants={participants} but a round asks {sampled} sites to "
                "train: no round could be aggregated. Lower it, or raise fraction."
            )
        device = training_device(accelerator, devices, engine)
        with self._restored_on_failure(checkpoint_dir):
            self._fit_feature_scale(sites)
            history = self._run(sites, config, progress_bar, engine, checkpoint_dir, resume, device)
        self._record_split(sites, self._site_rows())
        self._check_what_training_gave(sites, config, "rounds")
        return history

    def train_centralized(
        self,
        max_epochs: int = 50,
        kl_warmup_epochs: int | None = None,
        progress_bar: bool = True,
        accelerator: str = "auto",
        devices: int | str = "auto",
        **settings: Any,
    ) -> pd.DataFrame:
        """Train the same model on all rows pooled, as one site: the centralized reference.

        Same optimiser, minibatching, KL schedule and model selection as
        :meth:`train_federated`, so the two differ only in where the data sit. (scvi-tools'
        ``train`` also works on these models and uses Lightning.)

        Parameters
        ----------
        max_epochs
            Epochs over all rows.
        kl_warmup_epochs
            Epochs of linear KL warm-up (default: half of ``max_epochs``).
        progress_bar
            Show a progress bar over epochs.
        accelerator, devices
            Where to train, as in :meth:`train_federated`.
        **settings
            Settings of :class:`~scinfl.federated.FederationConfig` by their flat names, as in
            :meth:`train_federated` (listed with their defaults by
            :meth:`~scinfl.federated.FederationConfig.setting_defaults`, documented in
            ``FederationConfig``): ``batch_size``, ``lr``, ``weight_decay``,
            ``validation_size``, ``balance_classes``,
            ``early_stopping``/``early_stopping_patience``, ``seed``, and privacy settings such
            as ``sample_dp_epsilon``. ``max_rounds`` and ``kl_warmup_rounds`` are
            ``max_epochs`` and ``kl_warmup_epochs`` here; ``secret_frames`` is ``False``
            (nothing travels). Settings of rounds across sites that would change what a
            pooled run does (``privacy="dp"``/``"secagg"``, ``local_epochs``,
            ``min_available``, ``strategy="fedprox"``) are refused; the others (``fraction``,
            ``min_cells_per_site``, ...) are ignored with an info line.

        Returns
        -------
        History, as :meth:`train_federated` returns it: one row per epoch, the one site named
        ``"all"``. Also stored in ``model.federated_history_`` (and ``model.history`` under
        scvi-tools' names).

        Examples
        --------
        >>> import scinfl
        >>> adata = scinfl.data.synthetic_counts(n_obs=120, n_vars=12, n_sites=3)
        >>> scinfl.model.INFL.setup_anndata(adata)
        >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=16)
        >>> history = model.train_centralized(max_epochs=2, progress_bar=False)
        >>> history["site"].unique().tolist()
        ['all']
        """
        check_setting_names(
            "train_centralized",
            settings,
            _CENTRALIZED_ARGUMENTS,
            {
                "max_rounds": "max_epochs",
                "kl_warmup_rounds": "kl_warmup_epochs",
                "n_epochs_kl_warmup": "kl_warmup_epochs",
            },
            pooled=True,
        )
        check_progress_bar(progress_bar)
        ignored = sorted(
            name for name in _ACROSS_SITES_IGNORED if settings.pop(name, None) is not None
        )
        if ignored:
            logger.info("%s: no use when every row is one site (ignored).", ", ".join(ignored))
        settings["secret_frames"] = False  # nothing travels
        try:
            config = self._federation_config(
                max_rounds=max_epochs, kl_warmup_rounds=kl_warmup_epochs, **settings
            )
        except (TypeError, ValueError) as error:
            # the checks are FederationConfig's, in its names for what are epochs here
            message = str(error).replace("max_rounds", "max_epochs")
            message = message.replace("kl_warmup_rounds", "kl_warmup_epochs")
            raise type(error)(message) from error
        self._revalidate_setup()
        site = SiteData.from_registry(
            self.adata_manager, "all", None, config.validation_size, config.seed
        )
        validate_sites({"all": site.n_train + site.n_val}, {"all": site.n_train}, 0, 2)
        device = training_device(accelerator, devices)
        with self._restored_on_failure():
            self._fit_feature_scale([site])
            history = self._run([site], config, progress_bar and "epochs", device=device)
        self._record_split([site], {"all": np.arange(self.adata.n_obs)})
        self._check_what_training_gave([site], config, "epochs")
        return history

    def train(self, *args: Any, **kwargs: Any) -> None:
        """scvi-tools' Lightning training on all rows, after fitting the feature scale.

        The same as :meth:`scvi.model.base.UnsupervisedTrainingMixin.train` (all its
        arguments), but continuous features are first standardised over all rows, as
        :meth:`train_centralized` and :meth:`train_federated` do.

        Parameters
        ----------
        *args, **kwargs
            Passed to scvi-tools' :meth:`scvi.model.base.UnsupervisedTrainingMixin.train`:
            ``max_epochs``, ``accelerator``, ``devices``, ``train_size``,
            ``validation_size``, ``batch_size``, ``early_stopping``, ``plan_kwargs`` (e.g.
            ``{"lr": 1e-3}``), and Lightning ``Trainer`` arguments (``enable_progress_bar``).

        Examples
        --------
        >>> import numpy as np, scinfl
        >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=8, n_sites=2)
        >>> adata.X = 3 * np.log1p(adata.X.toarray()) + 25
        >>> scinfl.model.INFL.setup_anndata(adata)
        >>> model = scinfl.model.INFL(adata, key_mode=None, gene_likelihood="normal")
        >>> model.train(max_epochs=1, enable_progress_bar=False)
        >>> bool(model.module.feature_loc.min() > 20)
        True
        """
        self._require_key()
        self._revalidate_setup()
        self._fit_feature_scale([SiteData.from_registry(self.adata_manager, "all", None, 0.0)])
        # a trained model is left in eval mode, which Lightning keeps (no dropout) unless told
        self.module.train()
        result = super().train(*args, **kwargs)
        # trained without DP: no guarantee is left to report or to continue
        self.dp_releases_, self.dp_epsilon_ = None, None
        return result

    @contextmanager
    def _restored_on_failure(self, checkpoint_dir: str | Path | None = None) -> Iterator[None]:
        """Leave the model as it was when a training run stops early (an error, Ctrl-C).

        A run trains the module in place: stopped part-way, it would hold one site's weights
        from the middle of a local epoch, in training mode (dropout on), under the history and
        ``is_trained_`` of the run before. The weights, buffers (the feature scale), device and
        mode the run started from are put back; the rounds completed are in the checkpoint
        directory, when there is one.
        """
        module = self.module
        state = {name: value.detach().cpu().clone() for name, value in module.state_dict().items()}
        training = module.training
        device = next(module.parameters()).device
        try:
            yield
        except BaseException as error:
            # the weights, not the buffers: a continuous model fits its feature scale before a
            # setting or a checkpoint can be refused, and no training ran then
            trained = any(
                not torch.equal(state[name], weight.detach().cpu())
                for name, weight in module.named_parameters()
            )
            module.to(device)
            module.load_state_dict(state)
            module.train(training)
            if not trained:  # refused before training: nothing to say
                raise
            resumable = (
                f" The rounds completed are in {str(checkpoint_dir)!r}: continue with resume=True."
                if checkpoint_dir is not None
                and (Path(checkpoint_dir) / "checkpoint.json").is_file()
                else ""
            )
            logger.warning(
                "Training stopped (%s): the model is left as it was before this call.%s",
                type(error).__name__,
                resumable,
            )
            raise

    def _fit_feature_scale(self, sites: list[SiteData]) -> None:
        """Standardise continuous features with their location and scale over all sites.

        Each site's missing-aware count, sum and sum of squares per feature (of its training
        rows) add up to those of the pooled rows; only these sums are combined, never rows.
        Every engine in this process plays all sites, so the sum is formed here; the module
        keeps the result as state each site holds and never uploads.
        """
        if not hasattr(self.module, "set_feature_scale") or not self.module.site_state_names:
            return
        moments = [feature_moments(site.feature_matrix(self.module)) for site in sites]
        count, total, squares = (np.sum(parts, axis=0) for parts in zip(*moments, strict=True))
        loc, scale = scale_from_moments(count, total, squares)
        self.module.set_feature_scale(loc, scale)
        logger.info(
            "Standardised %d features with their location and scale over %d sites.",
            len(count),
            len(sites),
        )
        rare = np.flatnonzero(scale == 0)
        if len(rare):
            names = getattr(self.adata, "var_names", None)
            named = names is not None and len(names) == len(scale)
            logger.info(
                "%d features have fewer than 2 observed values in the training rows of all "
                "sites (e.g. %s): the model treats them as missing, here and in new samples.",
                len(rare),
                list(names[rare[:5]]) if named else [f"feature {i}" for i in rare[:5]],
            )

    def _check_what_training_gave(
        self, sites: list[SiteData], config: FederationConfig, unit: str
    ) -> None:
        """Hook for a model class to check the model a run gave (``INFL``: its classifier)."""

    def _record_split(self, sites: list[SiteData], rows: dict[str, np.ndarray]) -> None:
        # scvi-tools' train_indices / validation_indices: the rows each site trained on and
        # held out (the members of a membership-inference audit)
        self.train_indices_ = np.sort(np.concatenate([rows[s.name][s.train_idx] for s in sites]))
        self.validation_indices_ = np.sort(np.concatenate([rows[s.name][s.val_idx] for s in sites]))

    def _dp_releases_before_run(
        self, checkpoint_dir: str | Path | None, resume: bool
    ) -> list[tuple[float, int]] | None:
        """The DP releases the weights a run starts from hold; ``None`` if trained without DP.

        A run that continues this model's weights composes with them. A resumed run takes them
        from its checkpoint directory, where its first start wrote them (the model object that
        resumes may be another, loaded from disk).
        """
        record = Path(checkpoint_dir) / _DP_EARLIER if checkpoint_dir is not None else None
        if resume and record is not None and record.is_file():
            saved = json.loads(record.read_text())
            return None if saved is None else [tuple(release) for release in saved]
        trained = getattr(self, "is_trained_", False)
        releases = getattr(self, "dp_releases_", None)
        earlier = None if trained and releases is None else list(releases or [])
        starting = record is not None and not record.parent.is_file()
        starting = starting and not (record.parent / "checkpoint.json").exists()
        if not resume and starting:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(earlier))
        return earlier

    def _run(
        self,
        sites: list[SiteData],
        config: FederationConfig,
        progress_bar: bool | str,
        engine: str = "local",
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        device: torch.device | None = None,
    ) -> pd.DataFrame:
        if device is not None:
            self.module.to(device)
        earlier = self._dp_releases_before_run(checkpoint_dir, resume)
        runner = run_local
        if engine == "flower":
            try:
                from scinfl.federated.flower import run_flower_simulation as runner
            except ImportError as err:
                raise ImportError(
                    "engine='flower' needs Flower: install the extra with `pip install 'scinfl[flower]'`."
                ) from err
        # training seeds torch from the run's seed (every site, every round): on a fork of the
        # global generator, so that the user's own draws after the call (the next model's
        # initial weights) are not reset to the same values by every run
        with forked_rng(self.module):
            torch.manual_seed(config.seed)
            server = runner(
                self.module,
                sites,
                config,
                key_fingerprint=self.key_fingerprint_,
                key_version=self.key_version_,
                progress_bar=progress_bar,
                checkpoint_dir=checkpoint_dir,
                resume=resume,
                key=self._key,
            )
        self.module.eval()
        self.is_trained_ = True
        history = server.history()
        history.attrs["best_round"] = server.best_round
        self.federated_history_ = history
        # a resumed run's history holds the checkpoint's rounds too: it replaces, not extends
        previous = None if resume else getattr(self, "history_", None)
        self.history_ = scvi_history(history, previous)
        self.dp_releases_, self.dp_epsilon_ = None, None
        if server.dp is not None and earlier is None:
            logger.warning(
                "This model was trained without DP before this DP run: the weights it started "
                "from are not covered, so it reports no epsilon (dp_epsilon_ is None; the "
                "history's dp_epsilon is this run's releases alone)."
            )
        elif server.dp is not None:
            self.dp_releases_ = [*earlier, *server.dp.release_events]
            self.dp_epsilon_ = dp_fedavg_epsilon(
                self.dp_releases_, server.dp.n_sites, server.dp.delta
            )
        # the frame the server holds the selected model in (secret frames), for the audit
        self.secret_frame_ = server.best_frame
        return history


#: file of a checkpoint directory holding the DP releases the run's starting weights held
_DP_EARLIER = "dp_releases_before.json"

#: scvi-tools' names (``model.history`` keys) of the federated history's columns
_SCVI_NAMES = {
    "train_loss": ("train_loss", "n_train"),
    "train_elbo": ("elbo_train", "n_train"),
    "train_reconstruction": ("reconstruction_loss_train", "n_train"),
    "train_kl": ("kl_local_train", "n_train"),
    "val_loss": ("validation_loss", "n_val"),
    "val_elbo": ("elbo_validation", "n_val"),
    "val_reconstruction": ("reconstruction_loss_validation", "n_val"),
    "val_kl": ("kl_local_validation", "n_val"),
    # the classifier's, as scvi-tools' SCANVI logs them, over the labelled rows
    "train_classification": ("train_classification_loss", "train_labelled"),
    "train_accuracy": ("train_accuracy", "train_labelled"),
    "val_classification": ("validation_classification_loss", "val_labelled"),
    "val_accuracy": ("validation_accuracy", "val_labelled"),
    # the round's, the same at every site that trained
    "kl_weight": ("kl_weight", "n_train"),
}


def scvi_history(
    history: pd.DataFrame, previous: dict[str, pd.DataFrame] | None = None
) -> dict[str, pd.DataFrame]:
    """``model.history`` as scvi-tools keeps it, from a federated history (one row per round x site).

    Each metric is the mean over the sites of the round weighted by their rows (training or
    validation), one row per round (an "epoch" of the federation), under scvi-tools' names
    (``train_loss``, ``elbo_train``, ``validation_loss``, ...), so that code reading ``model.history``
    and scvi-tools' own ``train()`` afterwards (which appends to it) work. A ``previous``
    history is continued (a second ``train_federated``).

    Examples
    --------
    >>> rows = pd.DataFrame({"round": [0, 0], "n_train": [1, 3], "train_loss": [2.0, 6.0],
    ...                      "n_val": [1, 1], "val_loss": [1.0, 3.0]})
    >>> history = scvi_history(rows)
    >>> history["train_loss"]["train_loss"].tolist()  # (1 * 2 + 3 * 6) / 4
    [5.0]
    """
    out = dict(previous or {})
    # every metric continues at the epoch after the last one of any metric (validation may have
    # been logged less often than training), and each round keeps its own epoch
    epochs = max((int(frame.index.max()) + 1 for frame in out.values() if len(frame)), default=0)
    history = history.copy()
    for split in ("train", "val"):  # the ELBO per row, as scvi-tools logs it
        parts = [f"{split}_reconstruction", f"{split}_kl"]
        if all(part in history for part in parts):
            history[f"{split}_elbo"] = history[parts[0]] + history[parts[1]]
    for column, (name, weight) in _SCVI_NAMES.items():
        if column not in history or weight not in history:
            continue
        rows = history[history[column].notna() & (history[weight] > 0)]
        if rows.empty:
            continue
        weighted = (rows[column] * rows[weight]).groupby(rows["round"]).sum()
        series = weighted / rows[weight].groupby(rows["round"]).sum()
        frame = series.to_frame(name)
        frame.index = pd.Index(epochs + series.index.to_numpy(dtype=int), name="epoch")
        out[name] = pd.concat([out[name], frame]) if name in out else frame
    return out


def training_device(
    accelerator: str = "auto", devices: int | str = "auto", engine: str = "local"
) -> torch.device:
    """The torch device of ``accelerator`` and ``devices`` (scvi-tools' rules), for one process.

    Examples
    --------
    >>> training_device("cpu")
    device(type='cpu')
    """
    if engine == "flower":
        if accelerator not in ("auto", "cpu"):
            raise ValueError(
                f"engine='flower' trains its virtual sites on CPU; accelerator={accelerator!r} "
                "works with engine='local' (all sites in this process, on that device)."
            )
        return torch.device("cpu")
    _, _, device = parse_device_args(
        accelerator, devices, return_device="torch", validate_single_device=True
    )
    return device


#: the arguments of the training methods besides the settings of FederationConfig
_FEDERATED_ARGUMENTS = (
    "max_rounds",
    "local_epochs",
    "engine",
    "checkpoint_dir",
    "resume",
    "progress_bar",
    "accelerator",
    "devices",
)
_CENTRALIZED_ARGUMENTS = (
    "max_epochs",
    "kl_warmup_epochs",
    "progress_bar",
    "accelerator",
    "devices",
)
#: settings of rounds across sites that would change what a pooled run does: refused there,
#: unless at the value that does nothing
_ACROSS_SITES_REFUSED = ("privacy", "local_epochs", "min_available", "strategy")
#: the others, which a pooled run has no use for and ignores (a settings dict shared with
#: train_federated, to compare the two)
_ACROSS_SITES_IGNORED = (
    "fraction",
    "min_sites",
    "mu",
    "min_cells_per_site",
    "dp_noise_multiplier",
    "dp_clipping_norm",
    "secret_frames",
    "secagg_min_participants",
)
#: scvi-tools' names of training arguments, and scinfl's for the same thing
_SCVI_TOOLS_NAMES = {
    "enable_progress_bar": "progress_bar",
    "train_size": "validation_size (the share of each site's rows held out)",
    "plan_kwargs": "lr= and weight_decay= themselves",
    "datasplitter_kwargs": "validation_size=",
    "check_val_every_n_epoch": "nothing: every round is validated",
    "early_stopping_monitor": "early_stopping=True (on the validation loss)",
}


def _changes_pooled(name: str, value: Any) -> bool:
    """Whether a setting of rounds across sites would change what a pooled run does."""
    if name == "privacy":
        # a PrivacyConfig of sample-level DP alone (DP-SGD) applies to pooled rows as well
        return getattr(value, "mode", value) is not None
    if name == "strategy":
        return value == "fedprox"  # another value is FederationConfig's to refuse
    return value != 1


def check_setting_names(
    method: str,
    settings: Mapping[str, Any],
    arguments: Sequence[str],
    renamed: Mapping[str, str],
    pooled: bool = False,
) -> None:
    """Refuse names a training method does not take, naming the one meant where there is one.

    Parameters
    ----------
    method
        The training method's name, for the message.
    settings
        Its keyword arguments beyond its own.
    arguments
        Its own arguments (listed beside the settings of
        :class:`~scinfl.federated.FederationConfig`).
    renamed
        Names that are another name in this method (``max_epochs`` is ``max_rounds`` in
        :meth:`~FederatedTrainingMixin.train_federated`).
    pooled
        The method trains on every row pooled as one site: the settings of rounds across
        sites that would change what it does (``privacy``, ``local_epochs``,
        ``min_available``, ``strategy``) are refused, unless at the value that does nothing.

    Raises
    ------
    TypeError
        Naming each unknown name and, for scvi-tools' names or renamed ones, the name here.

    Examples
    --------
    >>> check_setting_names("train_federated", {"lr": 1e-3}, ("max_rounds",), {})
    >>> check_setting_names("train_federated", {"max_epochs": 5}, ("max_rounds",), {"max_epochs": "max_rounds"})
    Traceback (most recent call last):
    ...
    TypeError: train_federated takes no max_epochs (here: max_rounds). ...
    """
    known = set(FederationConfig.setting_defaults()) - set(renamed)
    if pooled:
        known -= set(_ACROSS_SITES_REFUSED) | set(_ACROSS_SITES_IGNORED)
        across = [
            name
            for name in _ACROSS_SITES_REFUSED
            if name in settings and _changes_pooled(name, settings[name])
        ]
        if across:
            raise TypeError(
                f"{method} trains on every row pooled as one site: "
                + ", ".join(f"{name}={settings[name]!r}" for name in across)
                + " would change what it does (they are settings of train_federated, for rounds "
                "across sites)."
                + (
                    " For a guarantee per row here: sample_dp_epsilon."
                    if "privacy" in across
                    else ""
                )
            )
        settings = {
            name: value
            for name, value in settings.items()
            if name not in _ACROSS_SITES_REFUSED and name not in _ACROSS_SITES_IGNORED
        }
    unknown = [name for name in settings if name not in known]
    if not unknown:
        return
    meant = {**_SCVI_TOOLS_NAMES, **renamed}
    told = ", ".join(
        f"{name} (here: {meant[name]})" if name in meant else repr(name) for name in unknown
    )
    raise TypeError(
        f"{method} takes no {told}. Its arguments: {sorted(arguments)}; its settings: "
        f"{sorted(known - set(arguments))}."
    )


def check_progress_bar(progress_bar: Any) -> None:
    """Refuse a string as ``progress_bar`` (it became the bar's label); a truth value is read.

    Parameters
    ----------
    progress_bar
        The value given.

    Raises
    ------
    TypeError
        For a string.

    Examples
    --------
    >>> check_progress_bar(False)
    """
    if isinstance(progress_bar, str):
        raise TypeError(f"progress_bar must be True or False, got {progress_bar!r}.")


def registered_features_changed(manager, adata) -> str | None:
    """How ``adata``'s features differ from those its setup registered, or ``None``.

    Features reordered, added or removed are told by name. The same number of features under
    other names is a renaming (gene symbols for Ensembl ids, say), read by position as
    scvi-tools reads it: ``None``.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=30, n_vars=5, n_sites=1)
    >>> scinfl.model.INFL.setup_anndata(adata)
    >>> model = scinfl.model.INFL(adata, key_mode=None)
    >>> adata._inplace_subset_var(adata.var_names[::-1])
    >>> registered_features_changed(model.adata_manager, adata)
    'the same 5 features in another order'
    """
    if not isinstance(adata, AnnData) or REGISTRY_KEYS.X_KEY not in manager.data_registry:
        return None
    state = manager.get_state_registry(REGISTRY_KEYS.X_KEY)
    return features_changed(state.get("column_names", []), adata.var_names)


def features_changed(registered: Sequence, current: Sequence) -> str | None:
    """How the feature names ``current`` differ from ``registered`` (set up), or ``None``.

    Parameters
    ----------
    registered
        The features a model was set up with, in its order.
    current
        The features the data hold now.

    Returns
    -------
    What changed, in words, or ``None`` when nothing did or the features were only renamed
    (the same number, none of the old names): those are read by position.

    Examples
    --------
    >>> features_changed(["a", "b", "c"], ["a", "b"])
    '2 features, 3 at setup'
    >>> features_changed(["a", "b"], ["x", "y"]) is None
    True
    """
    names = pd.Index(np.asarray(registered).astype(str))
    current = pd.Index(np.asarray(current).astype(str))
    if len(names) == 0 or current.equals(names):
        return None
    if len(current) == len(names):
        if current.sort_values().equals(names.sort_values()):
            return f"the same {len(names)} features in another order"
        if not current.isin(names).any():
            return None  # renamed in place
        return f"{int((~current.isin(names)).sum())} of the {len(names)} features replaced"
    return f"{len(current)} features, {len(names)} at setup"
