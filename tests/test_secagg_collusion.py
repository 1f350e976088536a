"""Secure aggregation against the server plus a colluding site (issue #13, part 4).

Four sites agree on pairwise keys through the in-process engine, then train one round under
secure aggregation. The coalition is the server (every masked upload, every public key it
relayed) and site ``d`` (the federation's key, its own private key, its own plain update). What
it can compute from that view leaves each honest site's upload masked, while the sum of the
honest sites' updates comes out: what the game in docs/privacy.md allows, and no more.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import scinfl
from scinfl.federated import (
    FederatedServer,
    FederationConfig,
    InProcessTransport,
    KeyAdvertisement,
    PrivacyConfig,
    RefusedMessageError,
    Roster,
    SiteData,
    SiteIdentity,
    SiteProtocol,
    SiteRuntime,
    advertise_key,
    fedavg,
    generate_private_key,
    get_shared_parameters,
    mask_update,
    pair_secrets,
    public_key_of,
    train_round,
    unmask_sum,
    verify_advertisements,
)
from scinfl.federated._secure_aggregation import FIXED_POINT_BITS, _pair_masks, _self_masks
from scinfl.module import KeyedVAE

KEY = scinfl.Key.generate()
NAMES = ["a", "b", "c", "d"]
HONEST, COLLUDER = ["a", "b", "c"], "d"


def _transport(privacy):
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    module = KeyedVAE(n_input=10, n_hidden=8, n_latent=3, key_mode=None)
    federation = FederationConfig.from_settings(
        max_rounds=2, batch_size=16, privacy=privacy, secret_frames=False
    )
    runtimes = {
        name: SiteRuntime(
            module,
            SiteData.from_arrays(name, rng.poisson(2, (30 + 10 * i, 10)), seed=i),
            key=KEY,
            federation=federation,
        )
        for i, name in enumerate(NAMES)
    }
    return InProcessTransport(runtimes), federation, get_shared_parameters(module)


@pytest.fixture(scope="module")
def round_():
    """One round, plain and masked (the same seeded training): the coalition's view."""
    plain, federation, initial = _transport(None)
    updates = plain.train(0, NAMES, initial, federation.client_config(0))
    secure, federation, initial = _transport("secagg")
    secure.agree_keys(NAMES)
    config = federation.client_config(0, NAMES)
    masked = secure.train(0, NAMES, initial, config)
    # every upload is in: the sites reveal their self masks (the server holds the seeds)
    seeds = secure.reveal(0, NAMES, config)
    state = secure.protocols[COLLUDER].state
    return {u.site: u for u in updates}, {u.site: u for u in masked}, state, seeds


def _floats(update):
    return {name: value for name, value in update.parameters.items() if value.dtype == np.uint64}


def _strip_colluder_masks(upload, state, seeds):
    """What the coalition makes of an honest upload: its self mask (revealed to the server)
    and the masks it shares with ``d`` removed."""
    peers = json.loads(state.peer_keys)
    secret = pair_secrets(state.private_key, COLLUDER, peers, NAMES)[upload.site]
    values = _floats(upload)
    shapes = {name: value.shape for name, value in values.items()}
    masks = _pair_masks(secret, 0, 0, NAMES, shapes)
    own = _self_masks(seeds[upload.site], shapes)
    # the pair's first site (by name) added the mask: an honest site sorts before "d"
    return {name: value - masks[name] - own[name] for name, value in values.items()}


def _decode(values, n):
    return {
        name: value.view(np.int64).astype(np.float64) / (2.0**FIXED_POINT_BITS * n)
        for name, value in values.items()
    }


def test_the_aggregate_is_fedavg_of_the_plain_updates(round_):
    plain, masked, _, seeds = round_
    template = plain["a"].parameters
    result = unmask_sum(list(masked.values()), template, NAMES, seeds)
    expected = fedavg(list(plain.values()))
    for name in expected:
        np.testing.assert_allclose(result[name], expected[name], atol=1e-6, err_msg=name)


def test_server_and_one_site_leave_each_honest_upload_masked(round_):
    plain, masked, state, seeds = round_
    for site in HONEST:
        seen = _decode(_strip_colluder_masks(masked[site], state, seeds), plain[site].n)
        for name, value in seen.items():
            truth = plain[site].parameters[name].astype(np.float64)
            # the masks of the honest pairs remain: uniform noise on 2^64, not the update
            assert np.abs(value - truth).mean() > 1e3, (site, name)
        # over the whole upload (per tensor, small tensors correlate by chance): a correlation
        # of independent noise with the update is within 5 standard errors of 0
        value = np.concatenate([v.ravel() for v in seen.values()])
        truth = np.concatenate([plain[site].parameters[n].ravel() for n in seen])
        assert abs(np.corrcoef(value, truth)[0, 1]) < 5 / np.sqrt(value.size), site


def test_server_and_one_site_learn_the_sum_of_the_honest_updates(round_):
    """What the game allows: the honest sites' masks cancel among them, their sum comes out."""
    plain, masked, state, seeds = round_
    stripped = [_strip_colluder_masks(masked[site], state, seeds) for site in HONEST]
    total_n = sum(plain[site].n for site in HONEST)
    summed = {name: sum(s[name] for s in stripped) for name in stripped[0]}
    honest = fedavg([plain[site] for site in HONEST])
    for name, value in _decode(summed, total_n).items():
        np.testing.assert_allclose(value, honest[name], atol=1e-6, err_msg=name)


def test_without_pinned_identities_a_key_holder_relaying_forged_keys_unmasks_a_site():
    """Without a roster (docs/privacy.md): a server colluding with a key holder forges tags.

    It relays to site ``a`` public keys of its own for ``b`` and ``c``; ``a`` cannot tell them
    from the real ones (the tag uses the shared key), so the coalition unmasks ``a``'s upload.
    Pinned identities close this (next tests).
    """
    private = {site: generate_private_key() for site in NAMES}
    forged = {site: generate_private_key() for site in ("b", "c")}
    relayed = [advertise_key(private["a"], "a", KEY), advertise_key(private["d"], "d", KEY)]
    relayed += [advertise_key(forged[site], site, KEY) for site in forged]
    peers = verify_advertisements(relayed, KEY)  # a accepts: every tag is right
    update = scinfl.federated.ClientUpdate("a", 5, {"w": np.linspace(-1, 1, 50, dtype=np.float32)})
    upload = mask_update(update, pair_secrets(private["a"], "a", peers, NAMES), 0, NAMES)
    # the coalition holds d's private key and the forged ones: every mask of a's
    masks = {
        other: pair_secrets(secret, other, {"a": public_key_of(private["a"])}, ["a", other])["a"]
        for other, secret in {**forged, "d": private["d"]}.items()
    }
    value = upload.parameters["w"]
    for other in sorted(masks):
        value = value - _pair_masks(masks[other], 0, 0, NAMES, {"w": value.shape})["w"]
    np.testing.assert_allclose(_decode({"w": value}, 5)["w"], update.parameters["w"], atol=1e-6)


def _pinned_transport():
    """The four sites of :func:`_transport` under secure aggregation, each with its identity."""
    transport, federation, initial = _transport("secagg")
    identities = {name: SiteIdentity.generate(name) for name in NAMES}
    roster = Roster.from_identities(list(identities.values()))
    for name, runtime in transport.runtimes.items():
        pinned = replace(runtime, identity=identities[name], roster=roster)
        transport.runtimes[name] = pinned
        transport.protocols[name] = SiteProtocol(pinned)
    return transport, federation, initial, identities, roster


def test_pinned_identities_refuse_keys_forged_by_a_key_holder():
    """The same forgery as above, against sites that pin each other's identities: refused."""
    transport, _, _, identities, roster = _pinned_transport()
    honest = transport.protocols["a"]
    own = honest.advertise_key()
    assert verify_advertisements([own], KEY, roster) == {"a": own.public_key}
    coalition = {site: generate_private_key() for site in ("b", "c", "d")}
    for signer in (None, identities[COLLUDER]):  # unsigned, or signed by the colluder
        forged = [
            KeyAdvertisement(
                site, ad.public_key, ad.tag, "" if signer is None else signer.sign(b"any")
            )
            for site, ad in (
                (site, advertise_key(secret, site, KEY)) for site, secret in coalition.items()
            )
        ]
        with pytest.raises(RefusedMessageError, match="not signed by the identity the roster"):
            honest.install_peer_keys([own, *forged])
    with pytest.raises(ValueError, match="cannot sign for site 'b'"):
        advertise_key(coalition["b"], "b", KEY, identities[COLLUDER])
    assert not honest.state.peer_keys  # nothing was installed


def test_pinned_identities_aggregate_as_without(round_):
    plain, *_ = round_
    transport, federation, initial, _, _ = _pinned_transport()
    transport.agree_keys(NAMES)
    config = federation.client_config(0, NAMES)
    masked = transport.train(0, NAMES, initial, config)
    seeds = transport.reveal(0, NAMES, config)
    result = unmask_sum(masked, plain["a"].parameters, NAMES, seeds)
    expected = fedavg(list(plain.values()))
    for name in expected:
        np.testing.assert_allclose(result[name], expected[name], atol=1e-6, err_msg=name)


def test_an_identity_needs_the_roster_that_pins_it():
    transport, *_ = _transport("secagg")
    runtime = transport.runtimes["a"]
    identity = SiteIdentity.generate("a")
    with pytest.raises(ValueError, match="go together"):
        replace(runtime, identity=identity)
    other = Roster.from_identities([SiteIdentity.generate("a")])
    with pytest.raises(ValueError, match="not the one the roster pins"):
        replace(runtime, identity=identity, roster=other)


def test_a_faked_dropout_does_not_give_two_sums_of_one_round():
    """The server gets every upload of attempt 0, claims ``d`` dropped and reruns without it.

    Plain reruns would give the sum of a, b, c, d, then of a, b, c: d's update by difference.
    With self masks the sites reveal one attempt's seeds per round: attempt 0's sum stays
    unreadable, and a site that revealed takes part in no other attempt of the round.
    """
    plain, federation, initial = _transport(None)
    truth = {u.site: u for u in plain.train(0, NAMES, initial, federation.client_config(0))}
    transport, federation, initial = _transport("secagg")
    transport.agree_keys(NAMES)
    first = federation.client_config(0, NAMES, attempt=0)
    uploads = {u.site: u for u in transport.train(0, NAMES, initial, first)}
    survivors = ["a", "b", "c"]
    rerun = federation.client_config(0, survivors, attempt=1)
    transport.train(0, survivors, initial, rerun, attempt=1)
    seeds = transport.reveal(0, survivors, rerun)  # the honest step: attempt 1's sum
    for site in survivors:
        with pytest.raises(RefusedMessageError, match="revealed its self mask of round 0"):
            transport.protocols[site].reveal_self_mask(first)
        with pytest.raises(RefusedMessageError, match="revealed its self mask of round 0"):
            transport.protocols[site].train(initial, federation.client_config(0, NAMES, 2))
    # d reveals attempt 0's seed (its last upload): attempt 0 still carries a, b, c's self masks
    seeds_0 = {"d": transport.protocols["d"].reveal_self_mask(first)}
    with pytest.raises(ValueError, match="were not revealed"):
        unmask_sum(list(uploads.values()), initial, NAMES, seeds_0)
    unmasked_d = _floats(uploads["d"])
    own = _self_masks(seeds_0["d"], {name: value.shape for name, value in unmasked_d.items()})
    unmasked_d = {name: value - own[name] for name, value in unmasked_d.items()}
    views = [_floats(uploads[site]) for site in survivors] + [unmasked_d]
    total = {name: sum(view[name] for view in views) for name in unmasked_d}
    four = fedavg(list(truth.values()))
    total_n = sum(u.n for u in truth.values())
    for name, value in _decode(total, total_n).items():
        assert np.abs(value - four[name]).mean() > 1e3, name  # not the sum of the four
    assert set(seeds) == set(survivors)


def test_a_site_reveals_only_its_last_upload():
    transport, federation, initial = _transport("secagg")
    transport.agree_keys(NAMES)
    config = federation.client_config(0, NAMES)
    transport.train(0, NAMES, initial, config)
    other_list = federation.client_config(0, ["a", "b", "c"])
    with pytest.raises(RefusedMessageError, match="reveals that one's only"):
        transport.protocols["a"].reveal_self_mask(other_list)
    assert transport.protocols["a"].reveal_self_mask(config)


def test_sites_refuse_a_sum_smaller_than_their_minimum():
    """A sum of one honest site and colluders is that site's update: sites can demand more."""
    rng = np.random.default_rng(0)
    module = KeyedVAE(n_input=10, n_hidden=8, n_latent=3, key_mode=None)
    federation = FederationConfig.from_settings(
        max_rounds=2,
        batch_size=16,
        privacy="secagg",
        secret_frames=False,
        secagg_min_participants=3,
    )
    runtimes = {
        name: SiteRuntime(
            module,
            SiteData.from_arrays(name, rng.poisson(2, (30, 10)), seed=i),
            key=KEY,
            federation=federation,
        )
        for i, name in enumerate(NAMES)
    }
    transport, initial = InProcessTransport(runtimes), get_shared_parameters(module)
    transport.agree_keys(NAMES)
    pair = federation.client_config(0, ["a", "d"])
    with pytest.raises(RefusedMessageError, match="secagg_min_participants"):
        transport.protocols["a"].train(initial, pair)
    continuous = KeyedVAE(
        n_input=10, n_hidden=8, n_latent=3, key_mode=None, gene_likelihood="normal"
    )
    site = SiteRuntime(continuous, runtimes["a"].site, key=KEY, federation=federation)
    protocol = InProcessTransport({"a": site}).protocols["a"]
    protocol.state.private_key, protocol.state.peer_keys = (
        transport.protocols["a"].state.private_key,
        transport.protocols["a"].state.peer_keys,
    )
    with pytest.raises(RefusedMessageError, match="secagg_min_participants"):
        protocol.moments(["a", "d"])
    three = federation.client_config(0, ["a", "b", "d"])
    assert transport.protocols["a"].train(initial, three).site == "a"
    server = FederatedServer(initial, federation)
    with pytest.raises(RuntimeError, match="fewer than secagg_min_participants=3"):
        train_round(transport, server, 1, ["b", "c"])
    with pytest.raises(ValueError, match="must be >= 2"):
        PrivacyConfig("secagg", secagg_min_participants=1)
