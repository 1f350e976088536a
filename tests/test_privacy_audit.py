import matplotlib

matplotlib.use("Agg")

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

import scinfl
from scinfl.module import KeyedVAE
from scinfl.privacy import (
    Attack,
    AuditConfig,
    ReconstructionAttack,
    audit,
    client_loss,
    loss_attack,
    make_tensors,
    membership_metrics,
    rmia_attack,
    sample_losses,
    train_reference_models,
    training_rows,
    wrong_key_utility,
)

N_GENES = 40
FIXED_KEY = scinfl.Key(bytes(range(32)))  # the tests must not depend on a random draw
ALL_ATTACKS = [
    "analytic",
    "decoder-inversion",
    "inverting-gradients",
    "dlg",
    "label-prevalence",
    "loss",
    "rmia",
    "inference",
]


@pytest.fixture(scope="module")
def counts():
    adata = scinfl.data.synthetic_counts(n_obs=600, n_vars=N_GENES, n_labels=3, seed=0)
    return adata.X.toarray(), adata.obs["label"].cat.codes.to_numpy()


def _vae(**kwargs):
    return KeyedVAE(
        n_input=N_GENES, n_labels=3, classify=True, key_mode=None, dropout_rate=0.0, **kwargs
    )


def _tensors(counts, rows):
    x, y = counts
    return make_tensors(x[rows], labels=y[rows])


# -- membership ------------------------------------------------------------------------------
def test_membership_metrics_at_chance_on_random_scores():
    rng = np.random.default_rng(0)
    auc, tpr = membership_metrics(rng.normal(size=4000), rng.random(4000) < 0.5)
    assert abs(auc - 0.5) < 0.03
    assert tpr < 0.03
    assert membership_metrics([3.0, 2.0, 1.0, 0.0], [True, True, False, False]) == (1.0, 1.0)
    with pytest.raises(ValueError):
        membership_metrics([1.0, 2.0], [True, True])


def test_sample_losses_average_to_the_client_loss(counts):
    torch.manual_seed(0)
    vae = _vae(n_hidden=16)
    t = _tensors(counts, np.arange(12))
    per_sample = sample_losses(vae, t, kl_weight=0.5, batch_size=5)
    assert per_sample.shape == (12,)
    vae.eval()
    expected = float(client_loss(vae, t, kl_weight=0.5).detach())
    assert per_sample.mean() == pytest.approx(expected, rel=1e-5)


def test_loss_attack_near_chance_on_a_model_that_saw_neither_set(counts):
    torch.manual_seed(0)
    result = loss_attack(
        _vae(n_hidden=16), _tensors(counts, range(300)), _tensors(counts, range(300, 600))
    )
    assert abs(result.auc - 0.5) < 0.1


def test_loss_and_rmia_detect_members_of_an_overfit_model(counts):
    """Few samples, many epochs, large learning rate: the model memorises its members."""
    members, non_members, population = np.arange(30), np.arange(30, 90), np.arange(90, 210)

    def make():
        return _vae(n_hidden=64)

    target = train_reference_models(
        make, _tensors(counts, members), n_models=1, fraction=1.0, epochs=200, lr=0.01, seed=5
    ).modules[0]
    # the TPR at 10% FPR (chance: 0.1): at 1% FPR, with 60 non-members, it is the share of
    # members above every non-member, 0 to 0.1 from one seed (or float summation order) to the
    # next; over 8 seeds the AUC was 0.72-0.87 and the TPR at 10% FPR 0.33-0.63
    loss = loss_attack(target, _tensors(counts, members), _tensors(counts, non_members), fpr=0.1)
    assert loss.auc > 0.65
    assert loss.tpr > 0.2

    references = train_reference_models(
        make, _tensors(counts, population), n_models=2, epochs=100, lr=0.01, seed=1
    )
    assert references.trained_on.sum(1).tolist() == [60, 60]
    rmia = rmia_attack(
        target,
        references,
        _tensors(counts, members),
        _tensors(counts, non_members),
        _tensors(counts, population),
    )
    assert rmia.auc > 0.7
    assert ((rmia.scores >= 0) & (rmia.scores <= 1)).all()
    assert rmia.is_member.sum() == 30


# -- wrong-key utility -------------------------------------------------------------------------
def _trained(mode, n_rounds=12, **train_kwargs):
    adata = scinfl.data.synthetic_counts(n_obs=300, n_vars=N_GENES, n_labels=3, n_sites=2, seed=1)
    scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    torch.manual_seed(0)
    model = scinfl.model.INFL(adata, key=FIXED_KEY, key_mode=mode, n_hidden=32)
    # the key mode itself, without the secret frames a key turns on (test_secret_frames.py)
    train_kwargs.setdefault("secret_frames", False)
    model.train_federated(
        max_rounds=n_rounds, batch_size=32, progress_bar=False, seed=0, **train_kwargs
    )
    return model


def test_wrong_key_utility_pooled_vs_feature_mode():
    """docs/privacy.md: a wrong key of the pooled mode is almost the right key for the
    latent space; the keyed class order makes its classifier predict permuted labels. The
    feature mode's classifier is at chance without its key (its latent space still clusters)."""
    pooled_model = _trained("pooled")
    pooled = wrong_key_utility(pooled_model).set_index(["metric", "key_guess"])["value"]
    feature_table = wrong_key_utility(_trained("feature"))
    feature = feature_table.set_index(["metric", "key_guess"])["value"]
    chance = feature_table.set_index(["metric", "key_guess"])["chance"]
    for table in (pooled, feature):
        assert table["accuracy", "correct"] > 0.9
        assert table["agreement", "correct"] == 1.0
    # the wrong key (seed 0) and no key (identity) read the classes in another order than
    # the correct key: the classifier is at or below chance with either
    assert FIXED_KEY.permutation(3).tolist() == [1, 0, 2]
    assert scinfl.Key(np.random.default_rng(0).bytes(32)).permutation(3).tolist() == [1, 2, 0]
    for guess in ("wrong", "none"):
        assert pooled["accuracy", guess] < chance["accuracy", guess] + 0.1
        assert pooled["agreement", guess] < 0.5
        # but the pooled latent space is the same with any key: what the key does not hide
        assert pooled["knn_accuracy", guess] > pooled["knn_accuracy", "correct"] - 0.05
    # feature: predictions at chance level without the key
    for guess in ("wrong", "none"):
        assert feature["accuracy", guess] < chance["accuracy", guess] + 0.1
        assert feature["agreement", guess] < 0.5


def test_wrong_key_utility_on_a_module(counts):
    torch.manual_seed(0)
    vae = KeyedVAE(n_input=N_GENES, n_labels=3, classify=True, key_mode="pooled", n_hidden=16)
    vae.set_key(FIXED_KEY)
    table = wrong_key_utility(
        vae, _tensors(counts, range(60)), guesses=["correct", "none"], metrics=["accuracy", "ari"]
    )
    assert list(table.columns) == ["key_guess", "metric", "value", "chance"]
    # two guesses x two metrics, and the model-free reference of the latent-space metric
    assert len(table) == 5
    reference = table[table.key_guess == "no model"]
    assert reference["metric"].tolist() == ["ari"]
    # the synthetic labels are plain in the counts: principal components alone find them
    assert reference["value"].iloc[0] > 0.5
    assert (
        len(
            wrong_key_utility(
                vae,
                _tensors(counts, range(60)),
                guesses=["correct", "none"],
                metrics=["accuracy", "ari"],
                reference=False,
            )
        )
        == 4
    )
    with pytest.raises(ValueError):
        wrong_key_utility(vae, _tensors(counts, range(60)), metrics=["auc"])


# -- audit -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_model():
    return _trained(None, n_rounds=5, validation_size=0.3)


@pytest.fixture(scope="module")
def plain_audit(plain_model):
    return audit(
        plain_model,
        attacks=ALL_ATTACKS,
        upload_sizes=(1, 4),
        n_victims=2,
        dlg_iters=5,
        n_references=2,
        reference_epochs=2,
        validation_size=0.3,
        training_seed=0,
    )


def test_training_rows_match_the_federated_split(plain_model):
    members = training_rows(plain_model, validation_size=0.3, seed=0)
    history = plain_model.federated_history_
    assert members.sum() == history.loc[history["round"] == 0, "n_train"].sum()
    # another split is another set of rows
    assert (training_rows(plain_model, validation_size=0.3, seed=1) != members).any()
    # the model recorded the split it trained on (scvi-tools' train/validation_indices)
    recorded = training_rows(plain_model)
    np.testing.assert_array_equal(recorded, members)
    assert set(plain_model.validation_indices) == set(np.flatnonzero(~members))


def test_audit_returns_the_documented_table(plain_audit):
    df = plain_audit
    assert list(df.columns) == [
        "defence",
        "attack",
        "key_guess",
        "upload",
        "metric",
        "value",
        "sd",
        "chance",
        "n",
    ]
    assert set(df["defence"]) == {"plain"}
    assert set(df["attack"]) == set(ALL_ATTACKS)
    assert set(df["upload"]) == {"one-sample", "batch-4", "global-model"}
    # an unkeyed model: one attacker, its rows repeated for every key guess; the inference
    # utility's model-free reference once
    counts = df[df["key_guess"] != "no model"].groupby("key_guess").size()
    assert set(counts.index) == {"none", "wrong", "correct"} and counts.nunique() == 1
    reference = df[df["key_guess"] == "no model"]
    assert set(reference["attack"]) == {"inference"}
    assert sorted(reference["metric"]) == ["ari", "knn_accuracy"]
    fractions = df[df["metric"] != "partial_corr"]
    assert fractions["value"].between(-1, 1).all()
    rates = df[df["metric"].isin(["reidentification", "auc", "label_recovery", "accuracy"])]
    assert rates["value"].between(0, 1).all()
    assert df.loc[df["metric"] == "partial_corr", "value"].between(-1, 1).all()
    assert not df["value"].isna().any()
    assert set(df.loc[df["attack"] == "loss", "metric"]) == {"auc", "tpr@1%fpr"}


def test_audit_recovers_one_sample_uploads_of_a_plain_model(plain_audit):
    """Plain FedAvg must fail the audit, otherwise the audit proves nothing."""
    df = plain_audit.set_index(["attack", "key_guess", "upload", "metric"])["value"]
    for attack in ("analytic", "decoder-inversion"):
        assert df[attack, "none", "one-sample", "reidentification"] == 1.0
        assert df[attack, "none", "one-sample", "partial_corr"] > 0.99
    assert df["inverting-gradients", "none", "one-sample", "label_recovery"] == 1.0
    assert df["label-prevalence", "none", "one-sample", "label_recovery"] == 1.0


def test_audit_keyed_model_runs_each_guess(counts):
    model = _trained("pooled", n_rounds=2, validation_size=0.3)
    df = audit(
        model,
        attacks=["analytic", "adaptive-key", "label-prevalence", "inference"],
        key_guesses=["none", "correct"],
        dlg_iters=5,
        n_victims=2,
        validation_size=0.3,
        training_seed=0,
        defence="paper",
    )
    assert set(df["defence"]) == {"paper"}
    assert set(df["key_guess"]) == {"none", "correct", "no model"}
    assert set(df["attack"]) == {"analytic", "adaptive-key", "label-prevalence", "inference"}
    adaptive = df[df["attack"] == "adaptive-key"]
    assert {"reidentification", "partial_corr", "label_recovery"} < set(adaptive["metric"])
    labels = df[df["attack"] == "label-prevalence"].set_index("key_guess")["value"]
    assert labels["correct"] == 1.0  # the key maps every output unit to its class
    with pytest.raises(ValueError):
        audit(model, attacks=["magic"])
    with pytest.raises(ValueError):
        audit(model, key_guesses=["maybe"])


def test_audit_is_a_loop_over_attack_objects_with_one_config(plain_model):
    """Names and attack objects give the same table; keyword settings override the config."""
    config = AuditConfig(n_victims=2, validation_size=0.3, training_seed=0, seed=1)
    by_name = audit(plain_model, attacks=["loss", "analytic"], config=config, n_membership=20)
    by_object = audit(
        plain_model,
        attacks=[ReconstructionAttack(["analytic"]), "loss"],
        config=replace(config, n_membership=20),
    )
    # the named attacks run first, by family: the object's reconstruction rows come second
    key = ["attack", "key_guess", "metric"]
    pd.testing.assert_frame_equal(
        by_name.sort_values(key).reset_index(drop=True),
        by_object.sort_values(key).reset_index(drop=True),
    )
    assert by_name.loc[by_name["attack"] == "loss", "n"].iloc[0] == 40

    class Constant:
        name = "constant"

        def run(self, model, data, config):
            return [
                {"attack": self.name, "key_guess": g, "metric": "m", "value": config.seed}
                for g in data.attackers
            ]

    assert isinstance(Constant(), Attack)
    table = audit(plain_model, attacks=[Constant()], config=config)
    assert table["value"].tolist() == [1, 1, 1]  # repeated for each guess (unkeyed model)
    with pytest.raises(TypeError, match="n_victim"):
        audit(plain_model, attacks=["analytic"], n_victim=2)
    with pytest.raises(ValueError, match="reconstruction"):
        ReconstructionAttack(["loss"])


def test_audit_of_secure_aggregation_attacks_the_sum_of_sites(plain_model):
    """Under secure aggregation the server's upload is several sites' sum. The analytic attack
    still separates one participant from a sum of two one-sample uploads (a hidden unit active
    for one row only gives that row back): secure aggregation of a few tiny uploads is not
    enough, and the audit must show it."""
    from scinfl.privacy._audit import _draw_uploads
    from scinfl.privacy._utility import model_data

    data = model_data(plain_model)
    members = training_rows(plain_model, validation_size=0.3, seed=0)
    for rows in _draw_uploads(data, members, 2, 5, np.random.default_rng(0), aggregated_sites=2):
        assert len(rows) == 4 and len(set(data.sites[rows])) == 2
    summed = audit(
        plain_model,
        attacks=["analytic", "label-prevalence"],
        key_guesses=["none"],
        aggregated_sites=2,
        n_victims=4,
        validation_size=0.3,
        training_seed=0,
        defence="plain+secagg",
    )
    assert set(summed["attack"]) == {"analytic"}  # no single upload to read a label from
    summed = summed.set_index(["attack", "metric"])["value"]
    assert summed["analytic", "partial_corr"] > 0.9
    with pytest.raises(ValueError, match="aggregated_sites=3"):
        audit(plain_model, aggregated_sites=3, attacks=["analytic"], training_seed=0)


# -- plot ---------------------------------------------------------------------------------------
def test_pl_privacy_draws_one_panel_per_metric(plain_audit, tmp_path):
    import matplotlib.pyplot as plt

    df = pd.concat([plain_audit, plain_audit.assign(defence="copy")])
    df = df[df["attack"].isin(["analytic", "loss", "inference"])]
    fig = scinfl.pl.privacy(df, save=tmp_path / "audit.png")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == df["metric"].nunique() == 9
    # one bar per defence in every group of the first panel
    assert (
        len(visible[0].patches)
        == 2
        * df[df["metric"] == "reidentification"].groupby(["attack", "key_guess", "upload"]).ngroups
    )
    assert (tmp_path / "audit.png").stat().st_size > 0
    fig = scinfl.pl.privacy(df, metrics=["auc", "partial_corr"], x="attack", upload="one-sample")
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["auc", "partial_corr"]
    plt.close("all")
    with pytest.raises(ValueError):
        scinfl.pl.privacy(df.drop(columns="metric"))


def test_attacker_module_correct_guess_is_a_copy_with_the_key():
    from scinfl.privacy import attacker_module

    vae = KeyedVAE(n_input=N_GENES, key_mode="pooled")
    with pytest.raises(ValueError):
        attacker_module(vae, "correct")  # no key set
    vae.set_key(FIXED_KEY)
    copy = attacker_module(vae, "correct")
    assert copy is not vae
    assert torch.equal(copy.key_encoder.coordinates, vae.key_encoder.coordinates)


def test_audit_of_a_sample_dp_model_is_labelled_and_warns(caplog):
    model = _trained(None, n_rounds=1, sample_dp_epsilon=3.0)
    with pytest.raises(ValueError, match="trained on every row"):
        audit(model, attacks=["label-prevalence"])
    n = model.adata.n_obs
    public = np.zeros(n, dtype=bool)
    public[: n // 4] = True  # rows of the same kind, as if held out before training
    with caplog.at_level("WARNING", logger="scinfl"):
        df = audit(model, attacks=["label-prevalence"], members=~public, public=public)
    assert set(df["defence"]) == {"plain+sample-dp"}
    assert "upper bound" in caplog.text
