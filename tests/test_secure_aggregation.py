"""Secure aggregation with pairwise key agreement: masks cancel in the sum, and only there."""

import numpy as np
import pytest
import torch

import scinfl
from scinfl.federated import (
    ClientConfig,
    ClientUpdate,
    FederationConfig,
    IncompleteRoundError,
    fedavg,
    generate_private_key,
    mask_update,
    pair_secrets,
    protect_update,
    public_key_of,
    unmask_sum,
)

KEY = scinfl.Key(bytes(range(32)))
SITES = ["a", "b", "c"]
PRIVATE = {site: generate_private_key() for site in SITES}
PUBLIC = {site: public_key_of(private) for site, private in PRIVATE.items()}


def _secrets(site, participants=SITES, private=PRIVATE):
    """What ``site`` derives from the key agreement with the other ``participants``."""
    return pair_secrets(private[site], site, PUBLIC, participants)


def _mask(update, round_=0, participants=SITES, attempt=0, private=PRIVATE):
    secrets = _secrets(update.site, participants, private)
    return mask_update(update, secrets, round_, participants, attempt)


def _updates(seed=0):
    rng = np.random.default_rng(seed)
    return [
        ClientUpdate(
            site,
            int(n),
            {
                "w": rng.normal(size=(50, 20)).astype(np.float32),
                "b": rng.normal(scale=10, size=20).astype(np.float32),
                "steps": np.array([7], dtype=np.int64),
            },
        )
        for site, n in zip(SITES, (13, 200, 41), strict=True)
    ]


def test_masked_sum_is_fedavg():
    updates = _updates()
    masked = [_mask(u, round_=4) for u in updates]
    result = unmask_sum(masked, updates[0].parameters, SITES)
    expected = fedavg(updates)
    for name in expected:
        assert result[name].dtype == expected[name].dtype
        np.testing.assert_allclose(result[name], expected[name], atol=1e-6)


def test_a_masked_update_alone_says_nothing():
    update = _updates()[0]
    masked = _mask(update).parameters["w"]
    assert masked.dtype == np.uint64
    # uniform on [0, 2^64): no trace of the (small, centred) parameters it hides
    u = masked.astype(np.float64).ravel() / 2.0**64
    assert abs(u.mean() - 0.5) < 0.03 and abs(u.std() - 12**-0.5) < 0.02
    assert abs(np.corrcoef(u, update.parameters["w"].ravel())[0, 1]) < 0.1
    # fresh masks for another round, attempt or participant list
    for kwargs in ({"round_": 1}, {"round_": 0, "attempt": 1}):
        other = _mask(update, **kwargs).parameters["w"]
        assert not np.array_equal(other, masked)
    # integer counters are not masked
    assert _mask(update).parameters["steps"][0] == 7


def test_masks_need_the_agreed_keys_and_every_participant():
    updates = _updates()
    masked = [_mask(u) for u in updates]
    with pytest.raises(IncompleteRoundError, match="missing: \\['b'\\]") as err:
        unmask_sum([masked[0], masked[2]], updates[0].parameters, SITES)
    assert err.value.missing == ["b"]
    # a site masking with another private key breaks the sum: the server gets noise
    wrong = _mask(updates[1], private={**PRIVATE, "b": generate_private_key()})
    noise = unmask_sum([masked[0], wrong, masked[2]], updates[0].parameters, SITES)
    assert np.abs(noise["w"] - fedavg(updates)["w"]).mean() > 1e3
    # the round asked again of the two others, under fresh masks
    again = [_mask(u, 0, ["a", "c"], attempt=1) for u in (updates[0], updates[2])]
    np.testing.assert_allclose(
        unmask_sum(again, updates[0].parameters, ["a", "c"])["w"],
        fedavg([updates[0], updates[2]])["w"],
        atol=1e-6,
    )


def test_mask_update_errors_name_the_fix():
    update = _updates()[0]
    with pytest.raises(ValueError, match="not among the participants"):
        mask_update(update, _secrets("b"), 0, ["b", "c"])
    with pytest.raises(ValueError, match="run the key agreement"):
        mask_update(update, _secrets("a", ["a", "b"]), 0, SITES)
    update.parameters["w"][0, 0] = np.nan
    with pytest.raises(ValueError, match="lower the learning rate"):
        _mask(update)
    secure = ClientConfig(round=0, secure_aggregation=True, participants=SITES)
    with pytest.raises(ValueError, match="secrets="):
        protect_update(_updates()[0], None, secure)
    with pytest.raises(ValueError, match="'secagg'"):
        FederationConfig(privacy="secure")


def _model(adata, key):
    scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    torch.manual_seed(0)
    return scinfl.model.INFL(adata, key=key, n_hidden=16, n_latent=4)


def test_train_federated_with_secure_aggregation_gives_the_same_model():
    adata = scinfl.data.synthetic_counts(n_obs=240, n_vars=40, n_labels=3, n_sites=3, seed=2)
    kwargs = {"max_rounds": 3, "batch_size": 32, "seed": 0, "progress_bar": False}
    plain, secure = _model(adata.copy(), KEY), _model(adata.copy(), KEY)
    plain.train_federated(**kwargs)
    secure.train_federated(privacy="secagg", **kwargs)
    np.testing.assert_allclose(secure.get_latent(), plain.get_latent(), atol=1e-4)
    assert (
        secure.federated_history_.attrs["best_round"]
        == plain.federated_history_.attrs["best_round"]
    )
    scinfl.model.INFL.setup_anndata(adata, site_key="site", labels_key="label")
    unkeyed = scinfl.model.INFL(adata, key_mode=None, n_hidden=16)
    with pytest.raises(ValueError, match="key=scinfl.Key.generate"):
        unkeyed.train_federated(privacy="secagg", **kwargs)
    # an unkeyed architecture can still aggregate securely with a key
    no_key_mode = scinfl.model.INFL(adata, key=KEY, key_mode=None, n_hidden=16)
    no_key_mode.train_federated(privacy="secagg", **kwargs)
