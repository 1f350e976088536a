"""The privacy audit of a trained model: every attack, every key guess, one tidy table."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scvi
from scipy.optimize import linear_sum_assignment
from torch import nn

from ._adaptive import class_order_from_prevalence
from ._attacks import (
    analytic_attack,
    attacker_module,
    decoder_inversion,
    dlg,
    infer_label,
    output_layer,
)
from ._framed import framed_attackers
from ._membership import loss_attack, rmia_attack, train_reference_models
from ._metrics import candidate_scores, partial_correlation, reidentification_rate, top_k_overlap
from ._upload import upload_gradient
from ._utility import NO_MODEL, ModelData, model_data, wrong_key_utility

logger = logging.getLogger(__name__)

RECONSTRUCTION_ATTACKS = (
    "analytic",
    "decoder-inversion",
    "inverting-gradients",
    "dlg",
    "adaptive-key",
)
MEMBERSHIP_ATTACKS = ("loss", "rmia")
ATTACKS = (*RECONSTRUCTION_ATTACKS, "label-prevalence", *MEMBERSHIP_ATTACKS, "inference")
#: what :func:`audit` runs by default: every attack but the L2 ``"dlg"`` (inverting gradients is
#: the stronger gradient-matching attack) and ``"adaptive-key"`` (each costs minutes on CPU)
DEFAULT_ATTACKS = tuple(a for a in ATTACKS if a not in ("dlg", "adaptive-key"))
KEY_GUESSES = ("none", "wrong", "correct")
COLUMNS = ["defence", "attack", "key_guess", "upload", "metric", "value", "sd", "chance", "n"]
GLOBAL_MODEL = "global-model"
#: weight of the public-profile prior of the ``"adaptive-key"`` attacker (the gradient distance
#: is at most 2; the prior is a mean squared z-score over features)
ADAPTIVE_PRIOR_WEIGHT = 0.01


def training_rows(
    model, validation_size: float | None = None, seed: int | None = None
) -> np.ndarray:
    """Rows of the model's AnnData that :meth:`~scinfl.model.INFL.train_federated` trained on.

    These are the members of a membership inference attack. The validation rows were never
    trained on, but did select the best round. By default the split the model recorded when it
    was trained (``model.train_indices``); with ``validation_size`` (and ``seed``), the split
    ``train_federated`` draws for those values is reproduced instead.

    Parameters
    ----------
    model
        A model trained with :meth:`~scinfl.model.INFL.train_federated`.
    validation_size, seed
        Reproduce the split of ``train_federated(validation_size=..., seed=...)`` (default seed:
        ``scvi.settings.seed``).

    Returns
    -------
    Boolean mask over the rows of ``model.adata``.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=60, n_vars=20, n_sites=2)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate())
    >>> _ = model.train_federated(max_rounds=1, batch_size=16, progress_bar=False, seed=0)
    >>> members = training_rows(model)
    >>> int(members.sum()) == len(model.train_indices_)
    True
    >>> bool((training_rows(model, validation_size=0.1, seed=0) == members).all())
    True
    """
    n = model.adata.n_obs
    if validation_size is None and seed is None:
        if getattr(model, "train_indices_", None) is None:
            raise ValueError(
                "The model records no training split (not trained in this session): pass the "
                "validation_size and seed given to train_federated, or members= to audit()."
            )
        mask = np.zeros(n, dtype=bool)
        mask[np.asarray(model.train_indices_)] = True
        return mask
    if model.adata_manager.registry["setup_args"].get("site_key") is None:
        raise ValueError("The model has no site_key: pass members= explicitly.")
    validation_size = 0.1 if validation_size is None else validation_size
    seed = scvi.settings.seed if seed is None else seed
    seed = 0 if seed is None else int(seed)
    rows = model._site_rows()
    mask = np.zeros(n, dtype=bool)
    for site in model._site_data(validation_size, seed):
        mask[rows[site.name][site.train_idx]] = True
    return mask


def _as_mask(rows, n: int, name: str) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (n,):
            raise ValueError(f"{name}= as a boolean mask needs {n} entries, got {rows.shape}.")
        return rows
    mask = np.zeros(n, dtype=bool)
    mask[rows.astype(np.int64)] = True
    return mask


def _fresh_module(model) -> nn.Module:
    """An untrained module of the model's architecture (no key set)."""
    init = model.init_params_
    kwargs = dict(init.get("non_kwargs", {}))
    for group in init.get("kwargs", {}).values():
        kwargs.update(group)
    fresh = type(model)(model.adata, **kwargs).module
    target = set(model.module.state_dict())
    if set(fresh.state_dict()) != target and hasattr(
        getattr(fresh, "_key_mode", None), "install_model"
    ):
        fresh._key_mode.install_model(fresh)
    if set(fresh.state_dict()) != target:
        raise ValueError("Cannot rebuild the model's architecture for the reference models.")
    return fresh


def _defence_name(model, framed: bool = False) -> str:
    name = getattr(model.module, "key_mode_name", None) or "plain"
    if getattr(model, "dp_epsilon_", None) is not None:
        name = f"{name}+dp"
    if framed:
        name = f"{name}+frames"
    return name


def _upload_name(size: int) -> str:
    return "one-sample" if size == 1 else f"batch-{size}"


def _draw_uploads(
    data: ModelData,
    members: np.ndarray,
    size: int,
    n_uploads: int,
    rng,
    aggregated_sites: int = 1,
) -> list[np.ndarray]:
    """Rows of each upload: distinct victims for one-sample uploads, one site's rows otherwise.

    With ``aggregated_sites > 1`` (secure aggregation) what the server sees is the sum of that
    many sites' uploads: ``size`` rows from each of as many distinct sites (all its rows from a
    site that has fewer).
    """
    member_rows = np.flatnonzero(members)
    if aggregated_sites > 1:
        by_site = {s: member_rows[data.sites[member_rows] == s] for s in np.unique(data.sites)}
        eligible = [rows for rows in by_site.values() if len(rows)]
        if len(eligible) < aggregated_sites:
            raise ValueError(
                f"aggregated_sites={aggregated_sites} needs as many sites with training rows; "
                f"{len(eligible)} have them."
            )
        uploads = []
        for _ in range(n_uploads):
            chosen = rng.choice(len(eligible), aggregated_sites, replace=False)
            rows = [
                rng.choice(eligible[i], min(size, len(eligible[i])), replace=False) for i in chosen
            ]
            uploads.append(np.sort(np.concatenate(rows)))
        return uploads
    if size == 1:
        count = min(n_uploads, len(member_rows))
        return [np.array([r]) for r in rng.choice(member_rows, count, replace=False)]
    by_site = {s: member_rows[data.sites[member_rows] == s] for s in np.unique(data.sites)}
    eligible = [rows for rows in by_site.values() if len(rows) >= size]
    if not eligible:
        raise ValueError(f"No site has {size} training rows for a batch upload.")
    return [
        np.sort(rng.choice(eligible[rng.integers(len(eligible))], size, replace=False))
        for _ in range(n_uploads)
    ]


def _match(recs: np.ndarray, truths: np.ndarray, reference: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (reconstruction, upload row) the attacker is scored on: best matches.

    One reconstruction of a batch upload is scored against the row it resembles most; one
    reconstruction per row is matched to the rows by the assignment of highest total
    partial correlation.
    """
    scores = np.atleast_2d(candidate_scores(recs, truths, reference))
    if len(recs) == 1:
        return [(0, int(scores[0].argmax()))]
    rec_idx, row_idx = linear_sum_assignment(-scores)
    return list(zip(rec_idx.tolist(), row_idx.tolist(), strict=True))


def _reconstruct(attack, attacker, grads, size, dlg_iters, dlg_lr, seed, prior):
    """Reconstructions ``(k, p)`` and recovered labels (or ``None``)."""
    if attack == "analytic":
        return analytic_attack(attacker, grads)[None], None
    if attack == "decoder-inversion":
        return decoder_inversion(attacker, grads)[None], None
    if attack == "adaptive-key":
        # inverting gradients that also optimises the key material from the attacker's key
        # guess, starting at the public mean with the public profile as a prior; labels are
        # optimised too (without the key, the class order is unknown)
        rec = dlg(
            attacker,
            grads,
            n_samples=size,
            labels="optimize",
            distance="cosine",
            n_iter=dlg_iters,
            lr=dlg_lr,
            init="mean",
            reference=prior[0],
            optimize_key=True,
            prior_weight=ADAPTIVE_PRIOR_WEIGHT,
            prior_scale=prior[1],
            seed=seed,
        )
        return rec.x, rec.labels
    cosine = attack == "inverting-gradients"
    rec = dlg(
        attacker,
        grads,
        n_samples=size,
        labels="infer" if cosine else "optimize",
        distance="cosine" if cosine else "l2",
        n_iter=dlg_iters,
        lr=dlg_lr,
        seed=seed,
    )
    return rec.x, rec.labels


def _reconstruction_rows(
    module,
    attackers,
    data: ModelData,
    members: np.ndarray,
    attacks: Sequence[str],
    upload_sizes: Sequence[int],
    n_victims: int,
    n_candidates: int,
    top_k: int,
    reference: np.ndarray,
    reference_sd: np.ndarray,
    dlg_iters: int,
    dlg_lr: float,
    kl_weight: float,
    seed: int,
    rng,
    aggregated_sites: int = 1,
    views=None,
) -> list[dict]:
    views = views or {}
    log_var = bool(getattr(module, "log_variational", True))
    p = module.n_input
    n_labels = int(getattr(module, "n_labels", 0) or 0)
    classify = getattr(module, "classifier", None) is not None
    k_top = max(1, min(top_k, p // 2))
    rows = []
    for size in upload_sizes:
        uploads = _draw_uploads(data, members, size, n_victims, rng, aggregated_sites)
        victims = np.unique(np.concatenate(uploads))
        others = np.setdiff1d(np.arange(data.n_obs), victims)
        n_cands = min(n_candidates, data.n_obs)
        extra = rng.choice(others, min(len(others), 20 * n_cands), replace=False)
        pool = np.concatenate([victims, extra])  # candidates of re-identification
        pool_x = data.encoder_input(pool, log_var)
        position = {int(r): i for i, r in enumerate(pool)}
        scored = {(a, g): [] for a in attacks for g in attackers}
        for i, upload in enumerate(uploads):
            grads = upload_gradient(module, data.tensors(upload), kl_weight=kl_weight)
            truths = pool_x[[position[int(r)] for r in upload]]
            for guess, attacker in attackers.items():
                seen = views[guess](grads) if guess in views else grads
                for attack in attacks:
                    recs, labels = _reconstruct(
                        attack,
                        attacker,
                        seen,
                        len(upload),
                        dlg_iters,
                        dlg_lr,
                        seed=i,
                        prior=(reference, reference_sd),
                    )
                    for k, j in _match(recs, truths, reference):
                        label_hit = (
                            float(labels[k] == data.labels[upload[j]])
                            if labels is not None and classify
                            else np.nan
                        )
                        scored[(attack, guess)].append((recs[k], int(upload[j]), label_hit))
            logger.info("Upload %d/%d (%s) attacked.", i + 1, len(uploads), _upload_name(size))
        for (attack, guess), found in scored.items():
            recs = np.stack([f[0] for f in found])
            victims_pos = [position[f[1]] for f in found]
            truths = pool_x[victims_pos]
            pc = partial_correlation(recs, truths, reference)
            top = [top_k_overlap(r, t, k_top, reference) for r, t in zip(recs, truths, strict=True)]
            hits = [
                reidentification_rate(r[None], [v], pool_x, reference, n_cands, seed=seed)
                for r, v in zip(recs, victims_pos, strict=True)
            ]
            metrics = {
                "reidentification": (hits, 1.0 / n_cands),
                "partial_corr": (pc, 0.0),
                f"top{k_top}_overlap": (top, k_top / p),
            }
            labels_found = [f[2] for f in found]
            if not np.isnan(labels_found).all():
                metrics["label_recovery"] = (labels_found, 1.0 / max(n_labels, 1))
            for metric, (values, chance) in metrics.items():
                rows.append(
                    {
                        "attack": attack,
                        "key_guess": guess,
                        "upload": _upload_name(size),
                        "metric": metric,
                        "value": float(np.mean(values)),
                        "sd": float(np.std(values)),
                        "chance": chance,
                        "n": len(values),
                    }
                )
    return rows


def _label_prevalence_rows(
    module,
    attackers,
    data: ModelData,
    members: np.ndarray,
    public_rows: np.ndarray,
    n_uploads: int,
    kl_weight: float,
    rng,
    views=None,
) -> list[dict]:
    """Label recovery of iDLG on one-sample uploads, the class order guessed by prevalence.

    Without the key (guesses ``"none"`` and ``"wrong"``) the attacker ignores its key guess's
    class order and matches the units of all uploads to the public label counts
    (:func:`class_order_from_prevalence`); with ``"correct"`` it reads them through the key.
    An unkeyed model needs no guess: its units are the classes. Under secret frames
    (``views``) each guess reads the units from its own view of the uploads.
    """
    views = views or {}
    n_labels = int(module.n_labels)
    uploads = _draw_uploads(data, members, 1, n_uploads, rng)
    layer = output_layer(module, "classifier")[0]
    gradients = [
        upload_gradient(module, data.tensors(rows), kl_weight=kl_weight) for rows in uploads
    ]
    truth = np.array([data.labels[rows[0]] for rows in uploads])
    prevalence = np.bincount(data.labels[public_rows], minlength=n_labels)
    rows = []
    for guess, attacker in attackers.items():
        view = views.get(guess)
        units = [infer_label(view(g) if view else g, layer) for g in gradients]
        if guess == "correct":
            order = (
                np.arange(n_labels)
                if getattr(module, "class_order", None) is None
                else attacker.class_order.numpy()
            )
        elif getattr(module, "class_order", None) is None and view is None:
            order = np.arange(n_labels)
        else:
            order = class_order_from_prevalence(units, prevalence)
        found = np.argsort(order)[units]  # the class each unit carries under ``order``
        hits = (found == truth).astype(float)
        rows.append(
            {
                "attack": "label-prevalence",
                "key_guess": guess,
                "upload": _upload_name(1),
                "metric": "label_recovery",
                "value": float(hits.mean()),
                "sd": float(hits.std()),
                # an attacker without gradients guesses the most prevalent public class
                "chance": float(prevalence.max() / max(prevalence.sum(), 1)),
                "n": len(hits),
            }
        )
    return rows


def _membership_rows(
    model,
    attackers,
    data: ModelData,
    members: np.ndarray,
    held_out: np.ndarray,
    public_rows: np.ndarray,
    attacks: Sequence[str],
    n_membership: int,
    n_references: int,
    reference_epochs: int,
    reference_lr: float,
    reference_batch_size: int,
    fpr: float,
    kl_weight: float,
    seed: int,
    rng,
) -> list[dict]:
    count = min(n_membership, len(held_out), int(members.sum()))
    if count < 2:
        logger.warning("Membership inference skipped: fewer than 2 held-out rows.")
        return []
    member_t = data.tensors(np.sort(rng.choice(np.flatnonzero(members), count, replace=False)))
    non_member_t = data.tensors(np.sort(rng.choice(held_out, count, replace=False)))
    population = data.tensors(public_rows)
    rows = []
    for guess, attacker in attackers.items():
        results = {}
        if "loss" in attacks:
            results["loss"] = loss_attack(attacker, member_t, non_member_t, fpr, kl_weight)
        if "rmia" in attacks:

            def factory(attacker=attacker):
                fresh = _fresh_module(model)
                if getattr(fresh, "key_encoder", None) is not None:
                    fresh.key_encoder.set_coordinates(attacker.key_encoder.coordinates.clone())
                    if getattr(fresh, "classifier", None) is not None:
                        fresh.set_class_order(attacker.class_order)
                return fresh

            references = train_reference_models(
                factory,
                population,
                n_models=n_references,
                epochs=reference_epochs,
                batch_size=reference_batch_size,
                lr=reference_lr,
                seed=seed,
            )
            results["rmia"] = rmia_attack(
                attacker, references, member_t, non_member_t, population, fpr=fpr
            )
        for attack, result in results.items():
            for metric, value, chance in (
                ("auc", result.auc, 0.5),
                (f"tpr@{fpr:.0%}fpr", result.tpr, fpr),
            ):
                rows.append(
                    {
                        "attack": attack,
                        "key_guess": guess,
                        "upload": GLOBAL_MODEL,
                        "metric": metric,
                        "value": value,
                        "sd": np.nan,
                        "chance": chance,
                        "n": 2 * count,
                    }
                )
        logger.info("Membership inference with key guess %r done.", guess)
    return rows


def audit(
    model,
    adata=None,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    key_guesses: Sequence[str] = KEY_GUESSES,
    upload_sizes: Sequence[int] = (1,),
    aggregated_sites: int = 1,
    n_victims: int = 5,
    n_candidates: int = 100,
    top_k: int = 50,
    public=None,
    members=None,
    labels_key: str | None = None,
    validation_size: float | None = None,
    training_seed: int | None = None,
    dlg_iters: int = 200,
    dlg_lr: float = 0.1,
    n_label_uploads: int = 100,
    n_membership: int = 500,
    n_references: int = 4,
    reference_epochs: int | None = None,
    reference_lr: float = 1e-3,
    reference_batch_size: int = 128,
    fpr: float = 0.01,
    kl_weight: float = 1.0,
    defence: str | None = None,
    secret_frame: str | int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Audit a trained model against the attacks of the threat model, with every key guess.

    The adversary is the server (``docs/privacy.md``): it holds the global model, each site's
    upload and public data, and knows the key generator but not the key. For each key guess
    (``"none"``: secret material at zero, ``"wrong"``: a key from the same generator,
    ``"correct"``: the key, the upper bound; see :func:`~scinfl.privacy.attacker_module`) the
    audit runs:

    - on uploads of training rows (the gradient of a site's loss on ``upload_sizes`` rows at
      the global parameters, deterministic forward: the worst case for the defender):
      ``"analytic"`` (:func:`~scinfl.privacy.analytic_attack`), ``"decoder-inversion"``
      (:func:`~scinfl.privacy.decoder_inversion`; NB likelihood with per-gene dispersion
      only), ``"inverting-gradients"`` (cosine gradient matching, iDLG labels) and ``"dlg"``
      (L2 gradient matching, labels optimised), see :func:`~scinfl.privacy.dlg`;
      ``"adaptive-key"``: inverting gradients that also optimises the key material from the
      key guess, labels optimised, from the public mean with the public profile as a prior
      (``dlg(optimize_key=True)``; key modes with continuous key material only). Scores:
      ``reidentification`` among ``n_candidates`` rows (chance ``1 / n_candidates``),
      ``partial_corr`` given the public mean profile, ``top{k}_overlap``, and
      ``label_recovery`` (DLG attacks, models with a classifier). Scores are in the encoder's
      input space (``log1p`` counts for count models); a batch upload's reconstructions are
      matched to its rows first (best match);
    - ``"label-prevalence"``: iDLG's output unit of each of ``n_label_uploads`` one-sample
      uploads, mapped to a class through the order that matches the units' frequencies to
      the public label counts (:func:`~scinfl.privacy.class_order_from_prevalence`; needs
      no key). Score: ``label_recovery``, its ``chance`` the most prevalent public class;
    - on the global model: membership inference ``"loss"``
      (:func:`~scinfl.privacy.loss_attack`) and ``"rmia"``
      (:func:`~scinfl.privacy.rmia_attack`, reference models trained by the attacker on the
      public rows, with its key guess): ``auc`` and the TPR at ``fpr``;
      ``"inference"``: utility of the model run with the key guess
      (:func:`~scinfl.privacy.wrong_key_utility`), with its model-free reference (key guess
      ``"no model"``: kNN accuracy and ARI on principal components of the input).

    For an unkeyed model every key guess is the same attacker: it is run once and its rows are
    repeated for each guess.

    Parameters
    ----------
    model
        A trained :class:`~scinfl.model.INFL` with its key set.
    adata
        Data set up like the training data (default: the model's own).
    attacks
        Subset of ``("analytic", "decoder-inversion", "inverting-gradients", "dlg",
        "adaptive-key", "label-prevalence", "loss", "rmia", "inference")``; by default all
        but ``"dlg"`` and ``"adaptive-key"``. The gradient-matching attacks
        take most of the time: on pbmc68k (765 genes) with 2 CPU cores, about 0.1 s per
        iteration, i.e. ``n_victims x len(key_guesses) x dlg_iters x 0.1`` seconds each (4
        minutes for a keyed model with the defaults, 1.5 for an unkeyed one).
    key_guesses
        Subset of ``("none", "wrong", "correct")``.
    upload_sizes
        Rows per audited upload (``1`` = the one-sample worst case; a batch upload takes its
        rows from one site).
    aggregated_sites
        Under secure aggregation (``train_federated(privacy="secagg")``) the server sees only
        the sum of a round's uploads: with ``aggregated_sites=k`` each audited upload is that
        of ``k`` sites together, ``upload_sizes`` rows from each (or all of a smaller site's
        rows; equal weights per row; the
        reconstruction is scored against the participant it matches best). The
        ``"label-prevalence"`` attack is skipped (it reads single uploads).
    n_victims
        Uploads attacked per upload size.
    n_candidates, top_k
        Re-identification candidates and the ``k`` of the top-``k`` overlap (at most half the
        features).
    public
        Rows (indices or mask) of the attacker's public data: the reference profile, the
        reference models' training data and RMIA's population. Default: a random half of the
        rows the model did not train on (the other half are the non-members).
    members
        Rows (indices or mask) the model was trained on. Default: :func:`training_rows` (the
        split the model recorded, or the one ``validation_size`` and ``training_seed``
        reproduce; only with the model's own AnnData).
    labels_key
        ``.obs`` column of labels for the ``"inference"`` utility when the model has no
        classifier.
    validation_size, training_seed
        Reproduce the split of ``train_federated`` (see :func:`training_rows`); default: the
        split the model recorded.
    dlg_iters, dlg_lr
        Iterations and learning rate of the gradient-matching attacks.
    n_label_uploads
        One-sample uploads the ``"label-prevalence"`` attacker observes (one gradient each,
        cheap): the more it sees, the better its class-frequency estimate.
    n_membership
        Members and non-members (each) scored by membership inference, at most.
    n_references, reference_epochs, reference_lr, reference_batch_size
        RMIA's reference models (default epochs: the number of rounds in the model's
        federated history, else 50).
    fpr
        False-positive rate of the membership TPR.
    kl_weight
        KL weight of the audited round and of the membership losses.
    defence
        Name of the defence in the table (default: the key mode, ``"plain"`` without a key,
        with ``"+dp"`` for a model trained with differential privacy and ``"+frames"`` for
        one trained under secret frames).
    secret_frame
        Audit the model as trained under ``secret_frames``: the server holds the global
        parameters in this secret frame and each upload in the same one (the attacker's best
        case), and every key guess decodes both with its own frames
        (:func:`~scinfl.privacy.framed_attackers`). Default: the frame of the model's selected
        round when it was trained with ``secret_frames=True`` (``model.secret_frame_``), else
        none.
    seed
        Seed of the audit (victims, wrong key, splits, attacks).

    Returns
    -------
    Tidy DataFrame, one row per defence x attack x key guess x upload x metric, with columns
    ``defence``, ``attack``, ``key_guess``, ``upload`` (``"one-sample"``, ``"batch-32"``, or
    ``"global-model"`` for membership and inference), ``metric``, ``value`` (mean over
    victims), ``sd``, ``chance`` (the value of an attacker that guesses) and ``n``.

    Examples
    --------
    >>> import scinfl
    >>> adata = scinfl.data.synthetic_counts(n_obs=200, n_vars=100, n_sites=2)
    >>> scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    >>> model = scinfl.model.INFL(adata, key=scinfl.Key.generate(), n_hidden=16)
    >>> _ = model.train_federated(max_rounds=2, batch_size=32, progress_bar=False, seed=0)
    >>> df = audit(model, attacks=["analytic", "loss"], n_victims=2, training_seed=0)
    >>> sorted(df["metric"].unique())
    ['auc', 'partial_corr', 'reidentification', 'top50_overlap', 'tpr@1%fpr']
    """
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise ValueError(f"Unknown attacks {sorted(unknown)}; choose from {ATTACKS}.")
    bad = set(key_guesses) - set(KEY_GUESSES)
    if bad:
        raise ValueError(f"Unknown key guesses {sorted(bad)}; choose from {KEY_GUESSES}.")
    module = model.module
    if not module.has_key:
        raise ValueError("The model has no key set: the audit needs it to make the uploads.")
    own_data = adata is None or adata is model.adata
    data = model_data(model, adata)
    n = data.n_obs
    if members is None:
        if not own_data:
            raise ValueError("With another AnnData than the model's, pass members=.")
        member_mask = training_rows(model, validation_size, training_seed)
    else:
        member_mask = _as_mask(members, n, "members")
    # one random stream per part: the draws of a part do not depend on the attacks chosen
    rng_split, rng_uploads, rng_membership = (np.random.default_rng([seed, k]) for k in range(3))
    non_members = np.flatnonzero(~member_mask)
    if public is None:
        shuffled = rng_split.permutation(non_members)
        public_rows = np.sort(shuffled[: len(shuffled) // 2])
        held_out = np.sort(shuffled[len(shuffled) // 2 :])
    else:
        public_rows = np.flatnonzero(_as_mask(public, n, "public"))
        held_out = np.setdiff1d(non_members, public_rows)
        if member_mask[public_rows].any():
            logger.warning("Some public rows are training rows of the model.")
    if len(public_rows) == 0:
        raise ValueError("No public rows: pass public= or hold out rows from training.")
    log_var = bool(getattr(module, "log_variational", True))
    public_x = data.encoder_input(public_rows, log_var)
    reference = public_x.mean(0)

    keyed = getattr(module, "key_encoder", None) is not None
    if secret_frame is None:
        secret_frame = getattr(model, "secret_frame_", None)
    framed = secret_frame is not None
    run_guesses = list(key_guesses) if keyed or framed else ["none"]
    views = None
    if framed:
        key = getattr(model, "_key", None)
        if key is None:
            raise ValueError(
                "Auditing secret frames needs the model's scinfl.Key: create or load the model "
                "with key=."
            )
        attackers, views = framed_attackers(module, key, secret_frame, run_guesses, seed)
    else:
        attackers = {g: attacker_module(module, g, seed=seed) for g in run_guesses}
    rows: list[dict] = []
    reconstruction = [a for a in RECONSTRUCTION_ATTACKS if a in attacks]
    if "decoder-inversion" in reconstruction and (
        getattr(module, "gene_likelihood", None) != "nb"
        or getattr(module, "dispersion", None) != "gene"
    ):
        logger.info("decoder-inversion skipped: it needs gene_likelihood='nb', dispersion='gene'.")
        reconstruction.remove("decoder-inversion")
    if "adaptive-key" in reconstruction and not getattr(
        getattr(module, "key_encoder", None), "differentiable", False
    ):
        logger.info(
            "adaptive-key skipped: it needs a key mode with continuous key material "
            "('pooled' or 'feature-inr')."
        )
        reconstruction.remove("adaptive-key")
    if reconstruction:
        rows += _reconstruction_rows(
            module,
            attackers,
            data,
            member_mask,
            reconstruction,
            upload_sizes,
            n_victims,
            n_candidates,
            top_k,
            reference,
            public_x.std(0),
            dlg_iters,
            dlg_lr,
            kl_weight,
            seed,
            rng_uploads,
            aggregated_sites,
            views,
        )
    if "label-prevalence" in attacks and aggregated_sites > 1:
        logger.info("label-prevalence skipped: it reads single uploads, not aggregates.")
    elif "label-prevalence" in attacks:
        if getattr(module, "classifier", None) is not None:
            rows += _label_prevalence_rows(
                module,
                attackers,
                data,
                member_mask,
                public_rows,
                n_label_uploads,
                kl_weight,
                np.random.default_rng([seed, 3]),
                views,
            )
        else:
            logger.info("label-prevalence skipped: the model has no classifier.")
    membership = [a for a in MEMBERSHIP_ATTACKS if a in attacks]
    if membership:
        if reference_epochs is None:
            history = getattr(model, "federated_history_", None)
            reference_epochs = (
                int(history["round"].nunique())
                if history is not None and "round" in history
                else 50
            )
        rows += _membership_rows(
            model,
            attackers,
            data,
            member_mask,
            held_out,
            public_rows,
            membership,
            n_membership,
            n_references,
            reference_epochs,
            reference_lr,
            reference_batch_size,
            fpr,
            kl_weight,
            seed,
            rng_membership,
        )
    if "inference" in attacks:
        has_labels = data.label_names is not None or labels_key is not None
        if has_labels:
            utility = wrong_key_utility(
                model, adata, labels=labels_key, guesses=run_guesses, seed=seed, attackers=attackers
            )
            for record in utility.to_dict("records"):
                rows.append(
                    {
                        "attack": "inference",
                        "upload": GLOBAL_MODEL,
                        "sd": np.nan,
                        "n": n,
                        **record,
                    }
                )
        else:
            logger.info("Inference utility skipped: the model has no labels; pass labels_key=.")
    if not (keyed or framed):
        # one attacker for every guess; the model-free reference rows stay as they are
        rows = [
            {**row, "key_guess": guess}
            for row in rows
            for guess in ([row["key_guess"]] if row["key_guess"] == NO_MODEL else key_guesses)
        ]
    table = pd.DataFrame(rows, columns=COLUMNS[1:])
    table.insert(0, "defence", defence or _defence_name(model, framed))
    return table
