"""Settings of a federated run: one dataclass, with its privacy part nested.

In Python the settings are :class:`FederationConfig` with a :class:`PrivacyConfig` inside; at
the edges (``train_federated(**settings)``, a Flower run configuration, a checkpoint's JSON)
they are one flat mapping of *setting names* (:meth:`FederationConfig.setting_defaults`),
derived from the two dataclasses' fields and converted back by
:meth:`FederationConfig.from_settings`. A new option is a new field, nothing else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from scinfl._checks import check_value as _check

from ._client import ClientConfig

_PRIVACY_MODES = (None, "dp", "secagg")


def _setting_name(f: dataclasses.Field) -> str:
    """The flat name of a field: its own, unless its metadata gives another."""
    return f.metadata.get("setting", f.name)


def _setting_fields() -> Iterator[tuple[str, bool, dataclasses.Field]]:
    """Every setting: its flat name, whether it is in the privacy part, and its field."""
    for f in dataclasses.fields(FederationConfig):
        if f.init and f.name != "privacy":
            yield f.name, False, f
    for f in dataclasses.fields(PrivacyConfig):
        yield _setting_name(f), True, f


def _positive(value) -> bool:
    return value > 0


@dataclass
class PrivacyConfig:
    """What protects the sites' data beyond the key: DP, secure aggregation, secret frames.

    Parameters
    ----------
    mode
        ``None``; ``"dp"``: client-level DP-FedAvg (:class:`~scinfl.federated.DPFedAvg`) with
        ``dp_noise_multiplier``, ``dp_clipping_norm`` and the reporting ``dp_delta``;
        ``"secagg"``: the sites mask their updates with pairwise masks from pairwise key
        agreement (public keys tagged with the key), and the server learns only their sum
        (:func:`~scinfl.federated.mask_update`). Its setting name is ``privacy``
        (``train_federated(privacy="secagg")``).
    dp_noise_multiplier, dp_clipping_norm, dp_delta
        DP settings (with ``mode="dp"``; ``dp_delta`` is also the ``delta`` of
        ``sample_dp_epsilon``).
    sample_dp_epsilon, sample_dp_clipping_norm
        Sample-level DP at every site (DP-SGD, :class:`~scinfl.federated.DPSGDPlan`): each
        row's gradient is clipped to ``sample_dp_clipping_norm`` and the site adds Gaussian
        noise before anything leaves it, with the noise that keeps the whole run (every
        round) within ``sample_dp_epsilon`` at ``dp_delta`` for each site's rows, whatever the
        server does. It combines with secure aggregation and secret frames; see
        :class:`FederationConfig` for what it changes in training.
    secret_frames
        The parameters travel and are averaged in secret frames drawn from the key, new every
        round (:class:`~scinfl.federated.SecretFrames`). ``None`` (the default) is decided by
        :meth:`for_key`.
    secagg_min_participants
        Under secure aggregation, the fewest participants a sum may have: each site refuses to
        mask an upload (or its feature moments) among fewer, so the server cannot ask for a sum
        of one honest site and colluders. With ``t`` colluding sites, ``t + 2`` keeps every sum
        over at least two honest sites.

    Examples
    --------
    >>> PrivacyConfig("secagg").for_key(True).secret_frames
    True
    >>> PrivacyConfig("dp").for_key(True).secret_frames
    False
    """

    mode: str | None = field(default=None, metadata={"setting": "privacy"})
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5
    sample_dp_epsilon: float | None = None
    sample_dp_clipping_norm: float = 1.0
    secret_frames: bool | None = None
    secagg_min_participants: int = 2

    def __post_init__(self) -> None:
        _check("dp_noise_multiplier", self.dp_noise_multiplier, float, "a number > 0", _positive)
        _check("dp_clipping_norm", self.dp_clipping_norm, float, "a number > 0", _positive)
        _check("dp_delta", self.dp_delta, float, "a number in (0, 1)", lambda v: 0 < v < 1)
        if self.sample_dp_epsilon is not None:
            _check("sample_dp_epsilon", self.sample_dp_epsilon, float, "a number > 0", _positive)
        _check(
            "sample_dp_clipping_norm",
            self.sample_dp_clipping_norm,
            float,
            "a number > 0",
            _positive,
        )
        if self.secret_frames is not None:
            _check("secret_frames", self.secret_frames, bool, "True, False or None")
        _check("secagg_min_participants", self.secagg_min_participants, int, "an integer >= 2")
        if self.secagg_min_participants < 2:
            raise ValueError(
                "secagg_min_participants must be >= 2: a sum of one site is that site's update."
            )
        if self.mode not in _PRIVACY_MODES:
            raise ValueError(f"privacy must be None, 'dp' or 'secagg', got {self.mode!r}.")
        if self.secret_frames and self.mode == "dp":
            raise ValueError(
                "privacy='dp' clips and noises each site's update on the server, but under "
                "secret_frames the server cannot form an update (each round's parameters are in "
                "another secret frame). Use one or the other: secret_frames=False for DP-FedAvg."
            )
        if self.sample_dp_epsilon is not None and self.mode == "dp":
            raise ValueError(
                "sample_dp_epsilon (DP-SGD at the sites, a guarantee per row) and privacy='dp' "
                "(DP-FedAvg at the server, a guarantee per site) each report their epsilon as "
                "dp_epsilon in the history: use one of them (sample_dp_epsilon holds whatever "
                "the server does)."
            )

    @property
    def secure_aggregation(self) -> bool:
        """Whether the sites mask their updates (``mode="secagg"``)."""
        return self.mode == "secagg"

    @property
    def server_dp(self) -> bool:
        """Whether the server clips and noises the updates (``mode="dp"``)."""
        return self.mode == "dp"

    def unused_settings(self) -> list[str]:
        """DP-FedAvg's settings given other values than their defaults without ``privacy="dp"``.

        Returns
        -------
        ``"name=value"`` for each such setting (empty with ``mode="dp"``): settings that
        would have no effect, for a warning.

        Examples
        --------
        >>> PrivacyConfig(dp_noise_multiplier=5.0).unused_settings()
        ['dp_noise_multiplier=5.0']
        """
        if self.mode == "dp":
            return []
        return [
            f"{name}={getattr(self, name)}"
            for name in ("dp_noise_multiplier", "dp_clipping_norm")
            if getattr(self, name) != getattr(PrivacyConfig, name)
        ]

    def for_key(self, has_key: bool) -> PrivacyConfig:
        """These settings with ``secret_frames`` decided: the one place that rule lives.

        Left at ``None``, frames are on whenever the sites hold the federation's key (any key
        mode), except with ``mode="dp"``, whose server-side clipping needs updates in a common
        frame. Frames or secure aggregation without a key are refused.

        Parameters
        ----------
        has_key
            Whether the sites hold the federation's key.

        Returns
        -------
        A copy with ``secret_frames`` a bool.

        Raises
        ------
        ValueError
            Secret frames or secure aggregation asked for without a key.

        Examples
        --------
        >>> PrivacyConfig().for_key(False).secret_frames
        False
        """
        frames = self.secret_frames
        if frames is None:
            frames = has_key and not self.server_dp
        if (frames or self.secure_aggregation) and not has_key:
            what = "secret_frames=True" if frames else "privacy='secagg'"
            raise ValueError(
                f"{what} derives its secrets (frames, masks) from the federation's key: create "
                "the model with key=scinfl.Key.generate() (or call model.set_key(key)) first."
            )
        return dataclasses.replace(self, secret_frames=frames)


@dataclass
class FederationConfig:
    """Every setting of a federated run.

    The one source of the models' ``train_federated`` settings, of a Flower deployment's run
    configuration (:data:`~scinfl.federated.flower.app.DEFAULT_RUN_CONFIG` is derived from
    these fields) and of a checkpoint's settings. Flat names (``privacy="dp"``,
    ``dp_noise_multiplier=2.0``) are turned into this object by :meth:`from_settings`.

    Parameters
    ----------
    max_rounds
        Communication rounds.
    local_epochs
        Passes over a site's training rows per round.
    fraction, min_sites
        Fraction of the sites sampled each round, and the fewest sampled.
    batch_size, lr, weight_decay
        Local optimisation (Adam, a fresh optimiser each round). A site with fewer training
        rows than ``batch_size`` trains on all its rows in one minibatch.
    strategy, mu
        ``"fedavg"``, or ``"fedprox"``: each site adds ``mu/2 ||w - w_global||^2`` to its
        loss (``mu`` is used with ``"fedprox"`` only).
    balance_classes
        Weight each site's classification loss by the inverse frequency of its own labels.
        This balances the classes within each site; it cannot lift a class that only a
        small site holds (that site's update weighs its share of all rows in the average,
        and among its own rows the class may be common): such a class stays hard to learn.
    kl_warmup_rounds
        Rounds of linear KL warm-up, driven by the global round (default: half of
        ``max_rounds``).
    validation_size
        Fraction of each site's rows held out for validation and model selection.
    min_cells_per_site
        Smallest site accepted.
    early_stopping, early_stopping_patience
        Stop when the validation loss has not improved for that many rounds.
    seed
        Seed of the federation: splits, sampling and every site's randomness. The model's
        initial weights are drawn earlier, when the model is built, from torch's random
        state: set ``scvi.settings.seed`` before building it for a run that repeats exactly.
    min_available
        Fewest accepted updates a round needs (fewer: the run stops with an error, and can be
        resumed from its last checkpoint).
    privacy
        The privacy part (:class:`PrivacyConfig`); a string or ``None`` is its ``mode``.
        Under sample-level DP (``privacy.sample_dp_epsilon``) the sites release no losses
        (the history shows each site's epsilon spent instead), so there is no validation
        split (``validation_size`` is set to 0), no early stopping, and the last round's model
        is kept; ``balance_classes`` (weights from a site's label counts) is refused.

    Examples
    --------
    >>> FederationConfig(max_rounds=10).kl_weight(0)
    0.2
    >>> FederationConfig().for_key(True).privacy.secret_frames
    True
    >>> privacy = FederationConfig.from_settings(privacy="dp", dp_noise_multiplier=2.0).privacy
    >>> privacy.mode, privacy.dp_noise_multiplier
    ('dp', 2.0)
    """

    max_rounds: int = 50
    local_epochs: int = 1
    fraction: float = 1.0
    min_sites: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    strategy: str = "fedavg"
    mu: float = 0.01
    balance_classes: bool = False
    kl_warmup_rounds: int | None = None
    validation_size: float = 0.1
    min_cells_per_site: int = 2
    early_stopping: bool = False
    early_stopping_patience: int = 10
    seed: int = 0
    min_available: int = 1
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    kl_warmup_default: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.privacy, PrivacyConfig):
            self.privacy = PrivacyConfig(mode=self.privacy)
        self._check_values()
        if self.strategy not in ("fedavg", "fedprox"):
            raise ValueError(f"strategy must be 'fedavg' or 'fedprox', got {self.strategy!r}.")
        if self.privacy.sample_dp_epsilon is not None:
            self._check_sample_dp()
        if self.privacy.server_dp and self.early_stopping:
            # stopping on the sites' raw validation losses would make the released model
            # depend on data the noise does not cover
            raise ValueError(
                "early_stopping reads the sites' validation losses, which DP-FedAvg's noise does "
                "not cover (privacy='dp' keeps the last round): train without early_stopping."
            )
        if self.kl_warmup_rounds is None:
            self.kl_warmup_rounds = max(1, self.max_rounds // 2)
            self.kl_warmup_default = True

    def _check_values(self) -> None:
        """Types and ranges of every setting, named as the user gave it."""
        at_least = {
            "max_rounds": 1,
            "local_epochs": 1,
            "min_sites": 1,
            "batch_size": 1,
            "min_cells_per_site": 2,
            "early_stopping_patience": 1,
            "seed": 0,
            "min_available": 1,
        }
        for name, low in at_least.items():
            _check(
                name, getattr(self, name), int, f"an integer >= {low}", lambda v, lo=low: v >= lo
            )
        if self.kl_warmup_rounds is not None:
            _check(
                "kl_warmup_rounds", self.kl_warmup_rounds, int, "an integer >= 1 or None", _positive
            )
        _check("fraction", self.fraction, float, "a number in (0, 1]", lambda v: 0 < v <= 1)
        _check("lr", self.lr, float, "a number > 0", _positive)
        _check("weight_decay", self.weight_decay, float, "a number >= 0", lambda v: v >= 0)
        _check("mu", self.mu, float, "a number >= 0", lambda v: v >= 0)
        _check(
            "validation_size",
            self.validation_size,
            float,
            "a number in [0, 1)",
            lambda v: 0 <= v < 1,
        )
        for name in ("balance_classes", "early_stopping"):
            _check(name, getattr(self, name), bool, "True or False")
        if self.early_stopping and self.validation_size == 0:
            raise ValueError(
                "early_stopping watches the validation loss, and validation_size=0 holds no "
                "rows out to compute it: it would never stop. Set validation_size > 0 (e.g. "
                "0.1), or train without early_stopping."
            )

    def _check_sample_dp(self) -> None:
        if self.early_stopping:
            raise ValueError(
                "early_stopping needs the sites' validation losses, which sample-level DP "
                "does not release: train without early_stopping (the last round is kept)."
            )
        if self.balance_classes:
            raise ValueError(
                "balance_classes weights the loss by a site's label counts, which sample-level "
                "DP does not cover: train with balance_classes=False."
            )
        # no loss leaves a site, so validation rows would only be rows not trained on
        self.validation_size = 0.0

    @classmethod
    def setting_defaults(cls) -> dict[str, Any]:
        """Every setting by its flat name, with its default (``None`` where there is none).

        Returns
        -------
        Flat setting name to default value, the privacy settings included.

        Examples
        --------
        >>> defaults = FederationConfig.setting_defaults()
        >>> defaults["batch_size"], defaults["privacy"], defaults["dp_delta"]
        (128, None, 1e-05)
        """
        return {name: f.default for name, _, f in _setting_fields()}

    @classmethod
    def from_settings(cls, **settings: Any) -> FederationConfig:
        """Build the settings from flat names, those of :meth:`setting_defaults`.

        ``privacy`` may be a :class:`PrivacyConfig` (the other privacy names then change it)
        or its ``mode``.

        Parameters
        ----------
        **settings
            Flat settings (``max_rounds=3``, ``privacy="dp"``, ``dp_noise_multiplier=2.0``);
            the others keep their defaults.

        Returns
        -------
        The settings object.

        Raises
        ------
        TypeError
            A name that is not a setting.

        Examples
        --------
        >>> FederationConfig.from_settings(max_rounds=3, privacy="secagg").privacy.mode
        'secagg'
        """
        unknown = sorted(set(settings) - set(cls.setting_defaults()))
        if unknown:
            raise TypeError(
                f"Unknown training settings {unknown}; the settings are: "
                f"{sorted(cls.setting_defaults())}."
            )
        privacy = settings.pop("privacy", None)
        if not isinstance(privacy, PrivacyConfig):
            privacy = PrivacyConfig(mode=privacy)
        nested = {
            f.name: settings.pop(name)
            for name, in_privacy, f in _setting_fields()
            if in_privacy and name in settings
        }
        return cls(privacy=dataclasses.replace(privacy, **nested), **settings)

    def settings(self) -> dict[str, Any]:
        """These settings by flat name: the inverse of :meth:`from_settings`.

        Returns
        -------
        Flat setting name to value, for every name of :meth:`setting_defaults`.

        Examples
        --------
        >>> config = FederationConfig(max_rounds=4, privacy="dp")
        >>> FederationConfig.from_settings(**config.settings()) == config
        True
        """
        return {
            name: getattr(self.privacy if in_privacy else self, f.name)
            for name, in_privacy, f in _setting_fields()
        }

    @property
    def proximal_weight(self) -> float:
        """The FedProx weight the sites use: ``mu`` with ``"fedprox"``, 0 with ``"fedavg"``."""
        return self.mu if self.strategy == "fedprox" else 0.0

    def for_key(self, has_key: bool) -> FederationConfig:
        """These settings with the privacy part decided for the key (:meth:`PrivacyConfig.for_key`).

        Parameters
        ----------
        has_key
            Whether the sites hold the federation's key.

        Returns
        -------
        A copy with ``privacy.secret_frames`` decided.

        Examples
        --------
        >>> FederationConfig(privacy="dp").for_key(True).privacy.secret_frames
        False
        """
        warmup = None if self.kl_warmup_default else self.kl_warmup_rounds
        return dataclasses.replace(
            self, privacy=self.privacy.for_key(has_key), kl_warmup_rounds=warmup
        )

    def sites_per_round(self, n_sites: int) -> int:
        """How many of ``n_sites`` sites a round asks to train: the fraction, at least ``min_sites``.

        Parameters
        ----------
        n_sites
            Sites available.

        Returns
        -------
        ``min(n_sites, max(min_sites, ceil(fraction * n_sites)))``.

        Examples
        --------
        >>> FederationConfig(fraction=0.3, min_sites=2).sites_per_round(10)
        3
        """
        return min(n_sites, max(self.min_sites, math.ceil(self.fraction * n_sites)))

    def kl_weight(self, round_: int) -> float:
        """KL weight of a round: linear warm-up over the global rounds, never reset by a site.

        Parameters
        ----------
        round_
            Global round (0-based).

        Returns
        -------
        ``min(1, (round_ + 1) / kl_warmup_rounds)``.

        Examples
        --------
        >>> FederationConfig(kl_warmup_rounds=4).kl_weight(1)
        0.5
        """
        return float(min(1.0, (round_ + 1) / self.kl_warmup_rounds))

    def client_config(
        self, round_: int, participants: Sequence[str] = (), attempt: int = 0, frame: str = ""
    ) -> ClientConfig:
        """The instructions sent to every site in ``round_``.

        Under secure aggregation the ``participants`` of this ``attempt`` mask their updates;
        under secret frames the parameters sent along are in ``frame``.

        Parameters
        ----------
        round_
            Global round (0-based); fixes the KL weight.
        participants
            Sites asked to train in this attempt (kept only under secure aggregation).
        attempt
            Attempt of the round (kept only under secure aggregation).
        frame
            Name of the secret frame of the parameters sent along (kept only under secret
            frames).

        Returns
        -------
        The round's :class:`ClientConfig`.

        Examples
        --------
        >>> config = FederationConfig(kl_warmup_rounds=4, privacy="secagg")
        >>> instructions = config.client_config(1, participants=["b", "a"])
        >>> instructions.kl_weight, instructions.participants
        (0.5, ['a', 'b'])
        """
        privacy = self.privacy
        secure = privacy.secure_aggregation
        return ClientConfig(
            round=round_,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            kl_weight=self.kl_weight(round_),
            mu=self.proximal_weight,
            balance_classes=self.balance_classes,
            seed=self.seed,
            secure_aggregation=secure,
            participants=sorted(participants) if secure else [],
            attempt=attempt if secure else 0,
            secret_frames=bool(privacy.secret_frames),
            frame=frame if privacy.secret_frames else "",
            # the run's length matters to a site only under sample-level DP (its budget)
            max_rounds=self.max_rounds if privacy.sample_dp_epsilon else 0,
            sample_dp_epsilon=privacy.sample_dp_epsilon or 0.0,
            sample_dp_clipping_norm=privacy.sample_dp_clipping_norm,
            dp_delta=privacy.dp_delta,
        )


#: Settings a resumed run may change: they do not shape the trajectory of the rounds run.
_RESUMABLE = {
    "max_rounds",
    "min_cells_per_site",
    "early_stopping",
    "early_stopping_patience",
    "min_available",
}
#: Settings a resumed run must share with its checkpoint (they shape the trajectory).
TRAJECTORY_SETTINGS = tuple(n for n in FederationConfig.setting_defaults() if n not in _RESUMABLE)
