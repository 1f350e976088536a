"""Server side of a federation: site sampling, round instructions, aggregation, selection.

The same :class:`FederatedServer` drives the in-process engine and the Flower ``ServerApp``;
only the transport differs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ._aggregate import accept_updates, fedavg, is_count, is_finite_update
from ._client import ClientConfig, ClientUpdate
from ._config import TRAJECTORY_SETTINGS, FederationConfig
from ._dp import DPFedAvg
from ._parameters import Parameters
from ._secret_frames import INITIAL_FRAME, frame_id
from ._secure_aggregation import unmask_sum

logger = logging.getLogger(__name__)


_CHECKPOINT_FORMAT = "scinfl-federation-checkpoint"


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


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
    checkpoint_dir
        If set, the server state (global and selected parameters, round, history, DP
        accounting; never key material) is written there after every completed round, and
        :meth:`from_checkpoint` continues from it.
    n_sites
        Number of sites in the federation (the population of the DP accountant).
    next_round, stopped, rows
        State restored from a checkpoint (:meth:`from_checkpoint`; leave the defaults for a
        new run): the first round still to run, whether early stopping ended the run, and
        the history's rows (:meth:`history`).
    best_parameters, best_round, best_val_loss, rounds_without_improvement
        Checkpointed selection state: the selected global model so far, its round, its
        validation loss (weighted by validation rows; ``inf`` before any) and the rounds since
        it last improved (for early stopping).
    dp
        Checkpointed DP-FedAvg accountant; ``None`` builds one from ``config`` under
        ``privacy="dp"``.
    frame, best_frame
        Checkpointed names of the secret frames :attr:`parameters` and
        :attr:`best_parameters` are in (under secret frames; no secret).
    site_rows
        Training and validation rows of each site, ``(n_train, n_val)`` by name, as the sites
        declared them when the run began: an upload or evaluation reporting other counts is
        rejected (the counts weigh the sites in the average and in the selection). ``None``:
        only their form is checked.

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
    checkpoint_dir: str | Path | None = None
    n_sites: int | None = None
    next_round: int = 0
    stopped: bool = False
    rows: list[dict] = field(default_factory=list)
    best_parameters: Parameters | None = None
    best_round: int | None = None
    best_val_loss: float = np.inf
    rounds_without_improvement: int = 0
    dp: DPFedAvg | None = None
    frame: str = INITIAL_FRAME
    best_frame: str | None = None
    site_rows: dict[str, tuple[int, int]] | None = None
    #: the validation loss of the last round recorded (weighted by validation rows, the
    #: selection's), ``None`` before any or when no site could score
    last_val_loss: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.config.privacy.server_dp and self.dp is None:
            self.dp = DPFedAvg(
                noise_multiplier=self.config.privacy.dp_noise_multiplier,
                clipping_norm=self.config.privacy.dp_clipping_norm,
                n_sites=self.n_sites or 1,
                delta=self.config.privacy.dp_delta,
            )

    def _frame_or_none(self) -> str | None:
        return self.frame if self.config.privacy.secret_frames else None

    def client_config(
        self, round_: int, participants: Sequence[str] = (), attempt: int = 0
    ) -> ClientConfig:
        """The instructions that go with :attr:`parameters` in ``round_`` (their frame included).

        Parameters
        ----------
        round_
            Global round (0-based).
        participants, attempt
            The sites asked to train in this attempt of the round, and the attempt (used
            under secure aggregation).

        Returns
        -------
        The round's :class:`~scinfl.federated.ClientConfig`
        (:meth:`FederationConfig.client_config`).

        Examples
        --------
        >>> import numpy as np
        >>> server = FederatedServer({"w": np.zeros(1)}, FederationConfig.from_settings(secret_frames=True))
        >>> server.client_config(0).frame
        'initial'
        """
        return self.config.client_config(round_, participants, attempt, frame=self.frame)

    def rounds(self) -> range:
        """The rounds still to run: those after the last completed one, none once stopped early.

        Returns
        -------
        ``range(next_round, max_rounds)``, or an empty range after early stopping.

        Examples
        --------
        >>> import numpy as np
        >>> server = FederatedServer({"w": np.zeros(1)}, FederationConfig(max_rounds=3))
        >>> _ = server.record_evaluation(0, {})
        >>> list(server.rounds())
        [1, 2]
        """
        if self.stopped and self.config.early_stopping:
            return range(0)
        return range(self.next_round, self.config.max_rounds)

    def sample_sites(self, sites: Sequence[str], round_: int) -> list[str]:
        """The sites asked to train in ``round_`` (a seeded fraction, at least ``min_sites``).

        Parameters
        ----------
        sites
            The sites available in this round.
        round_
            Global round (0-based); with the federation's seed it fixes the draw.

        Returns
        -------
        The sampled sites, sorted (all of them when the fraction covers them).

        Examples
        --------
        >>> import numpy as np
        >>> config = FederationConfig(fraction=0.5, min_sites=1, seed=0)
        >>> server = FederatedServer({"w": np.zeros(1)}, config)
        >>> len(server.sample_sites(["a", "b", "c", "d"], round_=0))
        2
        """
        sites = sorted(sites)
        n = self.config.sites_per_round(len(sites))
        if n == len(sites):
            return sites
        rng = np.random.default_rng([self.config.seed, round_])
        return sorted(rng.choice(sites, size=n, replace=False).tolist())

    def aggregate(
        self,
        round_: int,
        updates: Sequence[ClientUpdate],
        participants: Sequence[str] | None = None,
        sent: ClientConfig | None = None,
        self_seeds: dict[str, bytes] | None = None,
    ) -> Parameters:
        """Check the key identity of the updates, aggregate them, record their metrics.

        FedAvg weighted by ``n_k``, DP-FedAvg under ``privacy="dp"``, or the sum of
        masked updates when ``"secagg"`` (every one of ``participants`` must be accepted, or
        :class:`~scinfl.federated.IncompleteRoundError` is raised and the round must be run
        again without the missing sites; ``self_seeds``: the participants' revealed self-mask
        seeds). Raises if fewer than ``config.min_available`` updates
        are accepted; the global model then stays that of the last completed round.

        Under ``secret_frames`` the updates are in the frame named by the parameters and the
        instructions ``sent`` (:func:`~scinfl.federated.frame_id`), which becomes :attr:`frame`.

        Parameters
        ----------
        round_
            Global round (0-based).
        updates
            The sites' updates (updates under another key, of another shape or not finite are
            dropped, and recorded as not accepted).
        participants
            Under secure aggregation, the sites whose masks are in the sum (default: the
            senders of ``updates``).
        sent
            The instructions the round was sent with (needed under secret frames).
        self_seeds
            Under secure aggregation, each participant's revealed self-mask seed.

        Returns
        -------
        The new global parameters (also :attr:`parameters`).

        Raises
        ------
        RuntimeError
            When fewer than ``min_available`` updates are accepted.
        FloatingPointError
            When every update holds NaN or infinite values.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl.federated import ClientUpdate
        >>> server = FederatedServer({"w": np.zeros(1)}, FederationConfig(max_rounds=1))
        >>> a = ClientUpdate("a", 1, {"w": np.array([1.0])})
        >>> b = ClientUpdate("b", 3, {"w": np.array([5.0])})
        >>> server.aggregate(0, [a, b])["w"]  # FedAvg, weighted by n
        array([4.])
        >>> server.history()[["site", "n_train", "accepted"]]
          site  n_train  accepted
        0    a        1      True
        1    b        3      True
        """
        accepted = accept_updates(
            updates,
            self.key_fingerprint,
            self.key_version,
            reference=self.parameters,
            expected_rows=None if self.site_rows is None else self._declared(0),
            masked=self.config.privacy.secure_aggregation,
        )
        self._check_enough_accepted(round_, updates, accepted)
        if self.config.privacy.secret_frames:
            if sent is None:
                raise ValueError("Under secret_frames, aggregate() needs the instructions sent.")
            frame = frame_id(self.parameters, sent)
        if self.config.privacy.secure_aggregation:
            if participants is None:
                participants = [u.site for u in updates]
            self.parameters = unmask_sum(accepted, self.parameters, participants, self_seeds)
            extra = {}
        else:
            self.parameters, extra = self._average(accepted, round_)
        if self.config.privacy.secret_frames:
            self.frame = frame
        kl_weight = self.config.kl_weight(round_)
        for update in updates:
            self.rows.append(
                {
                    **_site_metrics(update.site, update.metrics),
                    "round": round_,
                    "site": update.site,
                    "n_train": update.n,
                    "trained": True,
                    "accepted": update in accepted,
                    "kl_weight": kl_weight,
                    **extra,
                }
            )
        return self.parameters

    def _check_enough_accepted(
        self, round_: int, updates: Sequence[ClientUpdate], accepted: list[ClientUpdate]
    ) -> None:
        """Refuse a round with no accepted update, or fewer than ``min_available``."""
        if not accepted and updates and not any(is_finite_update(u) for u in updates):
            noise = ""
            if self.dp is not None:
                # DP-FedAvg adds noise of std z C / m to every averaged parameter each round
                std = self.dp.noise_multiplier * self.dp.clipping_norm / len(updates)
                noise = (
                    f" Under privacy='dp' the average gets noise of std {std:.3g} per parameter "
                    "every round, which a federation of few sites may not survive: more sites, "
                    "a lower dp_clipping_norm, or a lower dp_noise_multiplier (a weaker "
                    "guarantee)."
                )
            raise FloatingPointError(
                f"Round {round_}: training diverged at every site (their updates hold NaN or "
                "infinite values). Lower the learning rate (lr=), and check the data (values far "
                f"from 1 in magnitude: log-transform intensities).{noise}"
            )
        if not accepted:
            raise RuntimeError(
                f"Round {round_}: no update was accepted (all sites failed, or all used another "
                "key). Check that every site loaded the federation's key file."
            )
        if len(accepted) < self.config.min_available:
            saved = self.checkpoint_dir is not None and round_ > 0
            then = "continue with resume=True from the last checkpoint" if saved else "train again"
            rejected = sorted(u.site for u in updates if not any(u is a for a in accepted))
            raise RuntimeError(
                f"Round {round_}: {len(accepted)} update(s) accepted "
                f"({sorted(u.site for u in accepted)}; rejected: {rejected}), fewer than "
                f"min_available={self.config.min_available} (sites failed, did not answer in "
                "time, or used another key). Bring the sites back (each with the federation's "
                f"key file) and {then}, or lower min_available."
            )

    def _average(self, accepted: list[ClientUpdate], round_: int) -> tuple[Parameters, dict]:
        """FedAvg of the accepted updates (DP-FedAvg's under ``privacy="dp"``), and what to record."""
        if self.dp is None:
            return fedavg(accepted), {}
        if any(u.counts for u in accepted):
            raise ValueError(
                "DP-FedAvg of a mosaic is not supported: its clipping and noise assume one "
                "weight per site, and some sites trained only some parameters (a modality "
                "they lack). Train without privacy='dp', or give every site every modality."
            )
        parameters = self.dp.aggregate(self.parameters, accepted, round_)
        epsilon = self.dp.epsilon()
        logger.debug("Round %d: epsilon %.3g at delta %g.", round_, epsilon, self.dp.delta)
        return parameters, {"dp_epsilon": epsilon}

    def _declared(self, which: int) -> dict[str, int]:
        """Each site's declared training (``which=0``) or validation (``1``) rows."""
        return {site: rows[which] for site, rows in (self.site_rows or {}).items()}

    def _selectable(self, round_: int, site_metrics: Mapping[str, Mapping]) -> dict:
        """The sites' metrics that count in the selection: validation rows, a finite loss.

        A site whose ``n_val`` is not a non-negative integer (or not the count it declared)
        or whose loss is NaN or infinite is left out, with a warning naming it: one site's
        broken evaluation would otherwise make the round unselectable for everyone, or weigh
        its loss as it pleases. Where every site's loss is NaN or infinite, the model
        diverged: they are all kept, and the round is not selectable.
        """
        declared = self._declared(1)
        losses = [m.get("val_loss", np.nan) for m in site_metrics.values() if m.get("n_val", 0)]
        if losses and not np.isfinite(losses).any():
            # every site's loss is NaN or infinite: the model diverged, the round is not
            # selectable (and the run says so if no round is)
            return {s: m for s, m in site_metrics.items() if m.get("n_val", 0)}
        selectable = {}
        for site, metrics in site_metrics.items():
            n_val, loss = metrics.get("n_val", 0), metrics.get("val_loss", np.nan)
            counted = is_count(n_val)
            if counted and site in declared and n_val != declared[site]:
                reason = f"it reports {n_val} validation rows, but declared {declared[site]}"
            elif not counted or n_val < 0:
                reason = f"it reports {n_val!r} validation rows, not a count"
            elif n_val > 0 and not np.isfinite(loss):
                reason = f"its validation loss is {loss!r}"
            else:
                if n_val > 0:
                    selectable[site] = metrics
                continue
            logger.warning(
                "Round %d: the evaluation of site %r is left out of the model selection: %s.",
                round_,
                site,
                reason,
            )
        return selectable

    def record_evaluation(self, round_: int, site_metrics: dict[str, dict[str, float]]) -> bool:
        """Record the validation metrics of the new global model; returns ``True`` to stop.

        The global model with the lowest validation loss (weighted by validation rows) is kept.
        This completes the round: with a ``checkpoint_dir``, the state is saved.

        Parameters
        ----------
        round_
            The round just aggregated (0-based).
        site_metrics
            Each site's validation metrics of the new global model, by site (``val_loss``,
            ``n_val``, ...); a site with ``n_val = 0`` does not count in the selection.

        Returns
        -------
        ``True`` when early stopping ends the run.

        Examples
        --------
        >>> import numpy as np
        >>> server = FederatedServer({"w": np.zeros(1)}, FederationConfig(max_rounds=2))
        >>> server.record_evaluation(0, {"a": {"n_val": 5, "val_loss": 2.0}})
        False
        >>> server.best_round, server.best_val_loss, server.next_round
        (0, 2.0, 1)
        """
        # this round's rows, at the end of the history (found from there: a scan of every row
        # for every site grew with rounds x sites^2)
        rows = {}
        for row in reversed(self.rows):
            if row["round"] != round_:
                break
            rows[row["site"]] = row
        for site, row in rows.items():
            if site in site_metrics:
                row.update(_site_metrics(site, site_metrics[site]))
        evaluated = self._selectable(round_, site_metrics)
        for site, metrics in site_metrics.items():
            if site not in rows:
                self.rows.append(
                    {
                        **_site_metrics(site, metrics),
                        "round": round_,
                        "site": site,
                        "n_train": 0,
                        "trained": False,  # not sampled, or away when the round trained
                        "accepted": False,
                    }
                )
        stop = False
        self.last_val_loss = (
            float(
                np.average(
                    [m["val_loss"] for m in evaluated.values()],
                    weights=[m["n_val"] for m in evaluated.values()],
                )
            )
            if evaluated
            else None
        )
        val_loss = self.last_val_loss
        # under DP-FedAvg the last round is released: choosing by the sites' raw validation
        # losses would make the released model depend on data the noise does not cover
        if val_loss is None or self.dp is not None:
            self.best_parameters, self.best_round = self.parameters, round_
            self.best_frame = self._frame_or_none()
        else:
            if val_loss < self.best_val_loss:
                self.best_val_loss = val_loss
                self.best_parameters = self.parameters
                self.best_frame = self._frame_or_none()
                self.best_round = round_
                self.rounds_without_improvement = 0
            else:
                self.rounds_without_improvement += 1
            stop = (
                self.config.early_stopping
                and self.rounds_without_improvement >= self.config.early_stopping_patience
            )
            if stop:
                logger.info(
                    "Early stopping after round %d (best round %d).", round_, self.best_round
                )
        self.next_round = round_ + 1
        self.stopped = stop
        if self.checkpoint_dir is not None:
            self.save_checkpoint(self.checkpoint_dir)
        return stop

    def selected(self) -> tuple[Parameters, str | None]:
        """The selected model's parameters and secret frame (``None`` without frames).

        Raises a clear error where no round could be selected: none ran, or every round's
        validation loss was ``NaN`` or infinite (training diverged).

        Returns
        -------
        The selected round's global parameters, and the name of their secret frame.

        Examples
        --------
        >>> import numpy as np
        >>> server = FederatedServer({"w": np.zeros(1)}, FederationConfig(max_rounds=1))
        >>> _ = server.record_evaluation(0, {"a": {"n_val": 2, "val_loss": float("nan")}})
        >>> server.selected()
        Traceback (most recent call last):
        ...
        FloatingPointError: Training diverged: the validation loss was NaN or infinite ...
        """
        if self.best_parameters is not None:
            return self.best_parameters, self.best_frame
        if not self.rows:
            raise RuntimeError("The federation ended before its first round; see the log above.")
        raise FloatingPointError(
            f"Training diverged: the validation loss was NaN or infinite in every one of the "
            f"{len({row['round'] for row in self.rows})} rounds, so there is no model to keep. "
            "Lower the learning rate (lr=), and check the data: values far from 1 in magnitude "
            "(log-transform intensities) or counts passed to gene_likelihood='normal'."
        )

    def history(self) -> pd.DataFrame:
        """One row per (round, site): sizes, training and validation metrics.

        Returns
        -------
        A data frame sorted by round and site: ``round``, ``site``, ``n_train``, ``trained``
        (whether the site trained that round), ``accepted`` (whether its update was
        aggregated), ``kl_weight``, the training metrics (``train_loss``, ...), the validation
        metrics (``val_loss``, ``n_val``, ...) and, under DP, ``dp_epsilon``; empty before the
        first round.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl.federated import ClientUpdate
        >>> server = FederatedServer({"w": np.zeros(1)}, FederationConfig(max_rounds=1))
        >>> _ = server.aggregate(0, [ClientUpdate("a", 4, {"w": np.ones(1)}, {"train_loss": 1.5})])
        >>> _ = server.record_evaluation(0, {"a": {"n_val": 2, "val_loss": 1.25}, "b": {"n_val": 3, "val_loss": 1.0}})
        >>> server.history()[["round", "site", "trained", "train_loss", "val_loss"]]
           round site  trained  train_loss  val_loss
        0      0    a     True         1.5      1.25
        1      0    b    False         NaN      1.00
        """
        df = pd.DataFrame(self.rows)
        if not df.empty:
            df = df.sort_values(["round", "site"], kind="stable").reset_index(drop=True)
        return df

    def dp_epsilon(self) -> float | None:
        """Epsilon spent so far (``None`` without ``privacy="dp"``).

        Returns
        -------
        The client-level epsilon of DP-FedAvg's releases at ``dp_delta``
        (:meth:`DPFedAvg.epsilon`), or ``None``.

        Examples
        --------
        >>> import numpy as np
        >>> FederatedServer({"w": np.zeros(1)}, FederationConfig()).dp_epsilon() is None
        True
        >>> server = FederatedServer({"w": np.zeros(1)}, FederationConfig(privacy="dp"), n_sites=2)
        >>> server.dp_epsilon()
        0.0
        """
        return None if self.dp is None else self.dp.epsilon()

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write the server state after the last completed round to ``directory``.

        ``round-NNNNN.npz`` holds the global and the selected parameters, ``checkpoint.json``
        the round, settings, selection state, DP accounting, the names of the parameters'
        secret frames (no secret: the maps need the key) and history; the JSON is replaced
        atomically last, so an interrupted write leaves the previous checkpoint intact. Only
        what the server holds is written: no key, no data.

        Parameters
        ----------
        directory
            Where to write (created if missing); older ``round-*.npz`` files there are
            removed.

        Returns
        -------
        ``directory``, as a :class:`~pathlib.Path`.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> server = FederatedServer({"w": np.zeros(1)}, FederationConfig(max_rounds=2))
        >>> _ = server.record_evaluation(0, {})
        >>> path = server.save_checkpoint(tempfile.mkdtemp())
        >>> FederatedServer.from_checkpoint(path, FederationConfig(max_rounds=2)).next_round
        1
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays_name = f"round-{self.next_round:05d}.npz"
        arrays = {f"global/{k}": v for k, v in self.parameters.items()}
        if self.best_parameters is not None:
            arrays.update({f"best/{k}": v for k, v in self.best_parameters.items()})
        tmp = directory / f".{arrays_name}.tmp"
        fresh = not (directory / arrays_name).exists()
        with _removed_on_failure(tmp):
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
            os.replace(tmp, directory / arrays_name)
        state = {
            "format": _CHECKPOINT_FORMAT,
            "version": 1,
            "arrays": arrays_name,
            "parameter_order": list(self.parameters),
            "next_round": self.next_round,
            "stopped": self.stopped,
            "best_round": self.best_round,
            "best_val_loss": self.best_val_loss if np.isfinite(self.best_val_loss) else None,
            "rounds_without_improvement": self.rounds_without_improvement,
            "key_fingerprint": self.key_fingerprint,
            "key_version": self.key_version,
            "config": self.config.settings(),
            "dp_releases": None if self.dp is None else list(self.dp.releases),
            "frame": self.frame,
            "best_frame": self.best_frame,
            "rows": self.rows,
        }
        tmp = directory / ".checkpoint.json.tmp"
        # the previous checkpoint.json names the previous arrays: new ones go if it fails
        with _removed_on_failure(tmp, *([directory / arrays_name] if fresh else [])):
            tmp.write_text(json.dumps(state, default=_json_default))
            os.replace(tmp, directory / "checkpoint.json")
        for old in directory.glob("round-*.npz"):
            if old.name != arrays_name:
                old.unlink()
        return directory

    @classmethod
    def from_checkpoint(
        cls,
        directory: str | Path,
        config: FederationConfig,
        key_fingerprint: str | None = None,
        key_version: int | None = None,
        n_sites: int | None = None,
    ) -> FederatedServer:
        """Continue a federation from :meth:`save_checkpoint`'s files.

        ``config`` may change ``max_rounds`` (to train longer), early stopping and
        ``min_available``; the settings that shape the trajectory (seed, learning rate, local
        epochs, KL warm-up, DP, ...) must be those of the checkpoint, and so must the key.
        Checkpoints are written again to ``directory``.

        Parameters
        ----------
        directory
            The checkpoint directory (:meth:`save_checkpoint`).
        config
            Settings of the continued run (see above for what may change).
        key_fingerprint, key_version
            The key identity of this run: must be the checkpoint's.
        n_sites
            Number of sites in the federation (the DP accountant's population).

        Returns
        -------
        A server whose next round is the first the checkpoint had not completed, with the
        checkpoint's parameters, selection, history and DP accounting.

        Raises
        ------
        FileNotFoundError
            When ``directory`` holds no checkpoint.
        ValueError
            When the key or a trajectory setting differs from the checkpoint's, or
            ``max_rounds`` is below the rounds it holds.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> config = FederationConfig(max_rounds=2)
        >>> server = FederatedServer({"w": np.zeros(1)}, config, checkpoint_dir=tempfile.mkdtemp())
        >>> _ = server.record_evaluation(0, {"a": {"n_val": 5, "val_loss": 2.0}})  # saves
        >>> resumed = FederatedServer.from_checkpoint(server.checkpoint_dir, config)
        >>> list(resumed.rounds()), resumed.best_val_loss
        ([1], 2.0)
        """
        directory = Path(directory)
        state = _read_checkpoint(directory)
        config = _resumable_config(state, config, directory)
        for what, ours, theirs in (
            ("fingerprint", key_fingerprint, state["key_fingerprint"]),
            ("version", key_version, state["key_version"]),
        ):
            if ours != theirs:
                raise ValueError(
                    f"Cannot resume from {directory}: it was trained under key {what} "
                    f"{theirs!r}, this run uses {ours!r}. Load the federation's key, or start a "
                    "new run (a rotated key needs a new run, see Key.rotate)."
                )
        order = state["parameter_order"]
        with np.load(directory / state["arrays"]) as npz:
            parameters = {name: npz[f"global/{name}"] for name in order}
            best = (
                {name: npz[f"best/{name}"] for name in order} if f"best/{order[0]}" in npz else None
            )
        server = cls(
            parameters=parameters,
            config=config,
            key_fingerprint=key_fingerprint,
            key_version=key_version,
            checkpoint_dir=directory,
            n_sites=n_sites,
            next_round=int(state["next_round"]),
            stopped=bool(state["stopped"]),
            rows=state["rows"],
            best_parameters=best,
            best_round=state["best_round"],
            best_val_loss=np.inf if state["best_val_loss"] is None else state["best_val_loss"],
            rounds_without_improvement=int(state["rounds_without_improvement"]),
            frame=state.get("frame", INITIAL_FRAME),
            best_frame=state.get("best_frame"),
        )
        if server.dp is not None:
            server.dp.releases = list(state["dp_releases"] or [])
        logger.info(
            "Resuming from %s after round %d (best round %s).",
            directory,
            server.next_round - 1,
            server.best_round,
        )
        return server


def _read_checkpoint(directory: Path) -> dict:
    """The state in ``directory/checkpoint.json``, or an error saying what is wrong with it."""
    path = directory / "checkpoint.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {directory} (no checkpoint.json). Start without resume=True, "
            "or pass the checkpoint_dir of the interrupted run."
        )
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a readable scinfl checkpoint: {error}.") from error
    if state.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a scinfl federation checkpoint.")
    return state


def _resumable_config(state: dict, config: FederationConfig, directory: Path) -> FederationConfig:
    """``config`` to continue the checkpointed run with (its default KL warm-up kept).

    Raises where ``config`` changes a setting that shapes the trajectory, or asks for fewer
    rounds than the checkpoint holds.
    """
    saved = state["config"]
    if config.kl_warmup_default and saved.get("kl_warmup_rounds") != config.kl_warmup_rounds:
        # a default warm-up follows max_rounds; a resumed run keeps the one it started with
        logger.info(
            "The KL warm-up stays as the run began: %s round(s) (max_rounds=%s); an "
            "uninterrupted run of max_rounds=%d would warm up over %d. Pass kl_warmup_rounds "
            "to choose.",
            saved["kl_warmup_rounds"],
            saved.get("max_rounds"),
            config.max_rounds,
            config.kl_warmup_rounds,
        )
        config = dataclasses.replace(config, kl_warmup_rounds=saved["kl_warmup_rounds"])
    settings = config.settings()
    changed = [
        f"{name} ({saved.get(name)!r} -> {settings[name]!r})"
        for name in TRAJECTORY_SETTINGS
        if saved.get(name, settings[name]) != settings[name]
    ]
    if config.privacy.sample_dp_epsilon is not None and saved["max_rounds"] != config.max_rounds:
        # each site's noise spreads the epsilon over the rounds the run was planned with
        changed.append(
            f"max_rounds ({saved['max_rounds']} -> {config.max_rounds}; under sample-level "
            "DP it is part of the budget)"
        )
    if changed:
        raise ValueError(
            f"Cannot resume from {directory}: settings differ from the checkpoint's: "
            f"{', '.join(changed)}. Resume with the same settings (only max_rounds, except "
            "under sample-level DP, early stopping and min_available may change), or start "
            "a new run in another checkpoint_dir."
        )
    if int(state["next_round"]) > config.max_rounds:
        raise ValueError(
            f"The checkpoint in {directory} holds {state['next_round']} completed rounds; "
            f"max_rounds={config.max_rounds} asks for fewer: pass max_rounds >= "
            f"{state['next_round']} (equal: the run as it stands)."
        )
    return config


@contextmanager
def _removed_on_failure(*paths: Path) -> Iterator[None]:
    """Remove ``paths`` (files being written) when the block fails: no stray partial files."""
    try:
        yield
    except BaseException:
        for path in paths:
            path.unlink(missing_ok=True)
        raise


#: history columns the server writes; a site's metrics of these names are dropped (a site's
#: own ``dp_epsilon`` under sample-level DP is its metric; DP-FedAvg's, the server's, wins)
_SERVER_COLUMNS = frozenset({"round", "site", "n_train", "trained", "accepted", "kl_weight"})


def _site_metrics(site: str, metrics: Mapping) -> dict:
    """``metrics`` without the server's own history columns (logged when a site sends them)."""
    taken = sorted(set(metrics) & _SERVER_COLUMNS)
    if taken:
        logger.warning(
            "Site %r sent metrics named like the server's columns %s: dropped.", site, taken
        )
    return {name: value for name, value in metrics.items() if name not in _SERVER_COLUMNS}
