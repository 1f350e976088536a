"""Server side of a federation: site sampling, round instructions, aggregation, selection.

The same :class:`FederatedServer` drives the in-process engine and the Flower ``ServerApp``;
only the transport differs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ._aggregate import accept_updates, fedavg
from ._client import ClientConfig, ClientUpdate
from ._parameters import Parameters

logger = logging.getLogger(__name__)


@dataclass
class FederationConfig:
    """Settings of a federated run (the server's side of ``train_federated``).

    Examples
    --------
    >>> FederationConfig(max_rounds=10).kl_weight(0)
    0.2
    """

    max_rounds: int = 50
    local_epochs: int = 1
    fraction: float = 1.0
    min_sites: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    mu: float = 0.0
    balance_classes: bool = False
    kl_warmup_rounds: int | None = None
    early_stopping: bool = False
    early_stopping_patience: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ValueError("max_rounds must be >= 1.")
        if self.local_epochs < 1:
            raise ValueError("local_epochs must be >= 1.")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}.")
        if self.mu < 0:
            raise ValueError("mu (FedProx) must be >= 0.")
        if self.kl_warmup_rounds is None:
            self.kl_warmup_rounds = max(1, self.max_rounds // 2)

    def kl_weight(self, round_: int) -> float:
        """KL weight of a round: linear warm-up over the global rounds, never reset by a site."""
        return float(min(1.0, (round_ + 1) / self.kl_warmup_rounds))

    def client_config(self, round_: int) -> ClientConfig:
        """The instructions sent to every site in ``round_``."""
        return ClientConfig(
            round=round_,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            kl_weight=self.kl_weight(round_),
            mu=self.mu,
            balance_classes=self.balance_classes,
            seed=self.seed,
        )


@dataclass
class FederatedServer:
    """Holds the global model's parameters and the history of a federation.

    Parameters
    ----------
    parameters
        Initial global parameters.
    config
        Federation settings.
    key_fingerprint, key_version
        The federation's key identity: updates under another key are rejected.

    Examples
    --------
    >>> import numpy as np
    >>> server = FederatedServer({"w": np.zeros(1)}, FederationConfig(max_rounds=2))
    >>> server.sample_sites(["a", "b", "c"], round_=0)
    ['a', 'b', 'c']
    """

    parameters: Parameters
    config: FederationConfig
    key_fingerprint: str | None = None
    key_version: int | None = None
    start_round: int = 0
    rows: list[dict] = field(default_factory=list)
    best_parameters: Parameters | None = None
    best_round: int | None = None
    best_val_loss: float = np.inf
    rounds_without_improvement: int = 0

    def sample_sites(self, sites: Sequence[str], round_: int) -> list[str]:
        """The sites asked to train in ``round_`` (a seeded fraction, at least ``min_sites``)."""
        sites = sorted(sites)
        n = max(self.config.min_sites, int(np.ceil(self.config.fraction * len(sites))))
        n = min(n, len(sites))
        if n == len(sites):
            return sites
        rng = np.random.default_rng([self.config.seed, round_])
        return sorted(rng.choice(sites, size=n, replace=False).tolist())

    def aggregate(self, round_: int, updates: Sequence[ClientUpdate]) -> Parameters:
        """Check the key identity of the updates, FedAvg them, record their metrics."""
        accepted = accept_updates(updates, self.key_fingerprint, self.key_version)
        kl_weight = self.config.kl_weight(round_)
        for update in updates:
            self.rows.append(
                {
                    "round": round_,
                    "site": update.site,
                    "n_train": update.n,
                    "accepted": update in accepted,
                    "kl_weight": kl_weight,
                    **update.metrics,
                }
            )
        if not accepted:
            raise RuntimeError(
                f"Round {round_}: no update was accepted (all sites failed, or all used another "
                "key). Check that every site loaded the federation's key file."
            )
        self.parameters = fedavg(accepted)
        return self.parameters

    def record_evaluation(self, round_: int, site_metrics: dict[str, dict[str, float]]) -> bool:
        """Record the validation metrics of the new global model; returns ``True`` to stop.

        The global model with the lowest validation loss (weighted by validation rows) is kept.
        """
        for row in self.rows:
            if row["round"] == round_ and row["site"] in site_metrics:
                row.update(site_metrics[row["site"]])
        evaluated = {s: m for s, m in site_metrics.items() if m.get("n_val", 0) > 0}
        for site, metrics in site_metrics.items():
            if not any(r["round"] == round_ and r["site"] == site for r in self.rows):
                self.rows.append(
                    {"round": round_, "site": site, "n_train": 0, "accepted": False, **metrics}
                )
        if not evaluated:
            self.best_parameters, self.best_round = self.parameters, round_
            return False
        weights = np.array([m["n_val"] for m in evaluated.values()])
        val_loss = float(np.average([m["val_loss"] for m in evaluated.values()], weights=weights))
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.best_parameters = self.parameters
            self.best_round = round_
            self.rounds_without_improvement = 0
        else:
            self.rounds_without_improvement += 1
        stop = (
            self.config.early_stopping
            and self.rounds_without_improvement >= self.config.early_stopping_patience
        )
        if stop:
            logger.info("Early stopping after round %d (best round %d).", round_, self.best_round)
        return stop

    def history(self) -> pd.DataFrame:
        """One row per (round, site): sizes, training and validation metrics."""
        df = pd.DataFrame(self.rows)
        if not df.empty:
            df = df.sort_values(["round", "site"], kind="stable").reset_index(drop=True)
        return df
