"""An active server without the key against real ClientApps (issue #13).

The server sends whatever messages it likes (replayed, reordered, crafted) to ClientApps with
per-node Contexts whose ``state`` persists, as Flower's do. Whatever it sends, no reply may carry
a plain parameter or a plain update, and no site may upload twice in one frame. The test holds
the key, so it knows every plain model it must not see.
"""

from __future__ import annotations

import copy
import dataclasses
import uuid

import numpy as np
import pytest

pytest.importorskip("flwr")

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import scinfl
from scinfl.federated import (
    FederatedServer,
    FederationConfig,
    SiteData,
    fedavg,
    frame_id,
    frames_for,
    get_shared_parameters,
    parameters_digest,
    run_local,
)
from scinfl.federated._key_agreement import (
    KeyAdvertisement,
    advertise_key,
    generate_private_key,
)
from scinfl.federated._secret_frames import INITIAL_FRAME
from scinfl.federated._site_runtime import SiteState
from scinfl.federated.flower import (
    SimulationSites,
    config_to_record,
    content_to_update,
    make_client_app,
    make_server_app,
    parameters_to_record,
    record_to_parameters,
)
from scinfl.federated.flower._client_app import (
    IN_SECRET_FRAME,
    PROTOCOL_STATE,
    PUBLIC_KEYS,
    WANT_PARAMETERS,
    WANT_PUBLIC_KEY,
)
from scinfl.federated.flower._records import (
    CONFIG,
    PARAMETERS,
    advertisements_to_record,
    record_to_advertisements,
)
from scinfl.module import KeyedVAE

from ._equality import assert_same_weights
from ._loopback import LoopbackGrid

N_VARS = 12
KEY = scinfl.Key.generate()
NAMES = ("a", "b", "c")


@pytest.fixture(autouse=True)
def task_identity():
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _sites() -> list[SiteData]:
    rng = np.random.default_rng(0)
    return [
        SiteData.from_arrays(s, rng.poisson(2, (40, N_VARS)), seed=i) for i, s in enumerate(NAMES)
    ]


def _module() -> KeyedVAE:
    torch.manual_seed(0)
    vae = KeyedVAE(n_input=N_VARS, n_hidden=8, n_latent=3)
    vae.set_key(KEY)
    return vae


def _settings(**changes) -> FederationConfig:
    settings = {"max_rounds": 3, "batch_size": 16, "kl_warmup_rounds": 2, "secret_frames": True}
    return FederationConfig.from_settings(**{**settings, **changes})


def _float_vector(parameters) -> np.ndarray:
    return np.concatenate(
        [np.ravel(v).astype(np.float64) for v in parameters.values() if np.ravel(v).size > 0]
    )


class Adversary:
    """The server: sends any message to any site's ClientApp, keeps what comes back.

    ``secrets`` are the plain models the test (which holds the key) knows of; ``uploads`` every
    upload by (site, frame it went to).
    """

    def __init__(self, settings: FederationConfig) -> None:
        self.settings = settings
        self.frames = frames_for(KEY)
        table = SimulationSites(
            copy.deepcopy(_module()),
            _sites(),
            keys=dict.fromkeys(NAMES, KEY),
            num_threads=torch.get_num_threads(),
            config=settings,
        )
        self.app = make_client_app(table)
        self.contexts = {
            name: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i},
                state=RecordDict(),
                run_config={},
            )
            for i, name in enumerate(NAMES)
        }
        self.initial = get_shared_parameters(_module())
        self.secrets: list[dict] = [self.initial]
        self.uploads: dict[tuple[str, str], set[str]] = {}
        self.replies: list[Message] = []

    def send(self, site: str, message_type: str, content: RecordDict) -> Message:
        message = Message(content, 100 + NAMES.index(site), message_type, group_id="x")
        message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        try:  # as Flower's runtime does: an exception becomes an error reply
            reply = self.app(message, self.contexts[site])
        except Exception as err:  # noqa: BLE001
            reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)
        self.replies.append(reply)
        return reply

    def query(self, site: str, **flags) -> Message:
        return self.send(site, "query", RecordDict({CONFIG: ConfigRecord(flags)}))

    def config(self, round_: int, frame: str, **changes):
        participants = list(NAMES) if self.settings.privacy.secure_aggregation else ()
        config = self.settings.client_config(round_, participants, frame=frame)
        return dataclasses.replace(config, **changes)

    def _model_message(self, parameters, config) -> RecordDict:
        return RecordDict(
            {PARAMETERS: parameters_to_record(parameters), CONFIG: config_to_record(config)}
        )

    def train(self, site: str, parameters, config) -> Message:
        reply = self.send(site, "train", self._model_message(parameters, config))
        if not reply.has_error():
            update = content_to_update(reply.content)
            frame = frame_id(parameters, config)
            self.uploads.setdefault((site, frame), set()).add(parameters_digest(update.parameters))
            if not config.secure_aggregation:  # the plain local model the server must not see
                self.secrets.append(self.frames.decode(update.parameters, frame))
        return reply

    def evaluate(self, site: str, parameters, config) -> Message:
        return self.send(site, "evaluate", self._model_message(parameters, config))

    def honest_round(self, round_: int, parameters, frame: str, sites=NAMES):
        """Train ``sites`` from ``parameters`` (in ``frame``); the aggregate and its frame."""
        config = self.config(round_, frame)
        replies = [self.train(s, parameters, config) for s in sites]
        assert not any(r.has_error() for r in replies), [
            r.error.reason for r in replies if r.has_error()
        ]
        updates = [content_to_update(r.content) for r in replies]
        aggregate, new_frame = fedavg(updates), frame_id(parameters, config)
        self.secrets.append(self.frames.decode(aggregate, new_frame))
        return aggregate, new_frame, updates

    def advertisement(self, site: str) -> Message:
        return self.query(site, **{WANT_PUBLIC_KEY: True})

    def relay(self, site: str, advertisements) -> Message:
        content = RecordDict({PUBLIC_KEYS: advertisements_to_record(advertisements)})
        return self.send(site, "query", content)

    def agree_keys(self, sites=NAMES) -> list[KeyAdvertisement]:
        """The honest key agreement: every site's public key, relayed to every site."""
        ads = [ad for s in sites for ad in record_to_advertisements(self._content(s))]
        replies = [self.relay(s, ads) for s in sites]
        assert not any(r.has_error() for r in replies), [r.error.reason for r in replies]
        return ads

    def _content(self, site: str):
        reply = self.advertisement(site)
        assert not reply.has_error(), reply.error.reason
        return reply.content[PUBLIC_KEYS]

    def initial_model(self):
        reply = self.query("a", **{WANT_PARAMETERS: True, IN_SECRET_FRAME: True})
        assert not reply.has_error(), reply.error.reason
        return record_to_parameters(reply.content[PARAMETERS])

    def assert_nothing_leaked(self) -> None:
        """No reply carries a plain model, a plain update, or a 2nd upload in one frame."""
        plain = [_float_vector(s) for s in self.secrets]
        updates = [a - b for i, a in enumerate(plain) for b in plain[:i]]
        for reply in self.replies:
            if reply.has_error() or PARAMETERS not in reply.content:
                continue
            sent = _float_vector(record_to_parameters(reply.content[PARAMETERS]))
            for secret in plain + updates:
                distance = np.linalg.norm(sent - secret) / max(np.linalg.norm(secret), 1e-12)
                assert distance > 1e-3, "a reply carried a plain model or update"
        for (site, frame), digests in self.uploads.items():
            assert len(digests) == 1, f"site {site} uploaded twice in frame {frame}"


def _refused(reply: Message, *words: str) -> None:
    assert reply.has_error(), "the site answered a message it should refuse"
    reason = reply.error.reason
    assert "RefusedMessageError" in reason, reason
    for word in words:
        assert word in reason, reason


def test_the_issue_break_is_closed():
    """Decode the site's own upload in an evaluate message, then a query without frames."""
    server = Adversary(_settings())
    x0 = server.initial_model()
    _, frame, updates = server.honest_round(0, x0, INITIAL_FRAME)
    own = updates[0].parameters  # site a's upload, in `frame`
    # evaluating its own upload in the frame it expects next: a loss, no parameters
    reply = server.evaluate("a", own, server.config(1, frame))
    assert not reply.has_error() and PARAMETERS not in reply.content
    # ... and no parameters after that, whatever the flag says
    _refused(server.query("a", **{WANT_PARAMETERS: True}), "received a model already")
    _refused(server.query("a", **{WANT_PARAMETERS: True, IN_SECRET_FRAME: True}), "already")
    # the identity alone is still answered
    assert not server.query("a").has_error()
    server.assert_nothing_leaked()


def test_frame_names_the_server_chooses():
    server = Adversary(_settings())
    x0 = server.initial_model()
    # round 0's model is in the initial frame only; no other round's is
    _refused(server.train("a", x0, server.config(0, "random")), "initial frame")
    aggregate, frame, _ = server.honest_round(0, x0, INITIAL_FRAME, sites=("a", "b"))
    _refused(server.train("a", aggregate, server.config(1, INITIAL_FRAME)), "initial frame")
    # a site that trained decodes only the frame of its upload; the refusal names the likely
    # honest cause too (a server on another scinfl version names frames otherwise)
    _refused(
        server.train("a", aggregate, server.config(1, "random")),
        "frame of its upload",
        "same version",
    )
    # the upload's frame named as round 0's decode frame: round 0 is over (and initial-only)
    _refused(server.train("a", x0, server.config(0, frame)), "one global model")
    # site c did not train in round 0: it cannot know the frame and accepts a random name, but
    # its upload goes to a frame of its own (the decode frame is bound into the upload frame)
    reply = server.train("c", aggregate, server.config(1, "random"))
    assert not reply.has_error()
    assert frame_id(aggregate, server.config(1, "random")) != frame_id(
        aggregate, server.config(1, frame)
    )
    # and now c's round 1 has its model: the honest round-1 model in another frame is refused
    _refused(server.train("c", aggregate, server.config(1, frame)), "one global model")
    server.assert_nothing_leaked()


def test_flags_are_the_sites_own():
    server = Adversary(_settings())
    # frames are on at this site: a query without the frame flag is refused
    _refused(server.query("a", **{WANT_PARAMETERS: True}), "secret frames on")
    x0 = server.initial_model()
    assert_same_weights(
        server.frames.decode(x0, INITIAL_FRAME)["px_r"], server.initial["px_r"], atol=1e-5
    )
    # instructions with frames off are refused (no plain training, no plain upload)
    _refused(server.train("a", x0, server.config(0, "", secret_frames=False)), "secret_frames")
    _refused(server.evaluate("a", x0, server.config(0, "", secret_frames=False)), "secret_frames")
    server.honest_round(0, x0, INITIAL_FRAME)
    _refused(server.query("b", **{WANT_PARAMETERS: True, IN_SECRET_FRAME: True}), "already")
    server.assert_nothing_leaked()


@pytest.mark.parametrize(
    "change",
    [
        {"local_epochs": 0},
        {"local_epochs": 50},
        {"lr": 1e3},
        {"eps": 1e-12},
        {"batch_size": 1},
        {"weight_decay": 5.0},
        {"mu": 10.0},
        {"kl_weight": 0.0},
        {"seed": 7},
        {"balance_classes": True},
        {"secure_aggregation": True, "participants": list(NAMES)},
        {"round": 3},
        {"round": -1},
    ],
    ids=lambda change: ",".join(f"{k}={v}" for k, v in change.items()),
)
def test_instructions_outside_the_sites_settings_are_refused(change):
    server = Adversary(_settings())
    x0 = server.initial_model()
    _refused(server.train("a", x0, server.config(0, INITIAL_FRAME, **change)), "refused")
    # a refused message changes nothing: the honest one is still answered
    assert not server.train("a", x0, server.config(0, INITIAL_FRAME)).has_error()
    server.assert_nothing_leaked()


def test_zero_scaled_and_other_sites_models():
    server = Adversary(_settings())
    x0 = server.initial_model()
    aggregate, frame, updates = server.honest_round(0, x0, INITIAL_FRAME)
    # the zero model in the expected frame: accepted (it decodes to zero, no secret in it)
    zero = {name: np.zeros_like(value) for name, value in aggregate.items()}
    assert not server.evaluate("a", zero, server.config(1, frame)).has_error()
    reply = server.train("a", zero, server.config(1, frame))
    assert not reply.has_error()
    # ... but one model per round: a scaled aggregate after it is refused, to train or evaluate
    scaled = {name: 2 * value for name, value in aggregate.items()}
    _refused(server.train("a", scaled, server.config(1, frame)), "one global model")
    _refused(server.evaluate("a", aggregate, server.config(1, frame)), "one global model")
    # site a's upload sent to site b as round 1's model: b decodes a's model and trains from
    # it, into a frame of its own; nothing comes back in plain coordinates
    reply = server.train("b", updates[0].parameters, server.config(1, frame))
    assert not reply.has_error()
    _refused(server.train("b", aggregate, server.config(1, frame)), "one global model")
    server.assert_nothing_leaked()


def test_replayed_and_reordered_messages():
    server = Adversary(_settings())
    x0 = server.initial_model()
    # evaluate the model of round 1 before round 0 on a site that cannot know its frame: a
    # loss; then round 0 is over for it
    aggregate, frame, _ = server.honest_round(0, x0, INITIAL_FRAME, sites=("a", "b"))
    assert not server.evaluate("c", aggregate, server.config(1, frame)).has_error()
    _refused(server.train("c", x0, server.config(0, INITIAL_FRAME)), "rounds only go forward")
    # replays of round 0 at a site that trained it
    _refused(server.train("a", x0, server.config(0, INITIAL_FRAME)), "trained in round 0")
    # (evaluating the model it trained from again: the same loss, no parameters)
    reply = server.evaluate("a", x0, server.config(0, INITIAL_FRAME))
    assert not reply.has_error() and PARAMETERS not in reply.content
    aggregate2, frame2, _ = server.honest_round(1, aggregate, frame)
    # replays of rounds 0 and 1, train and evaluate
    _refused(server.train("a", aggregate, server.config(1, frame)), "trained in round 1")
    _refused(server.train("b", x0, server.config(0, INITIAL_FRAME)), "rounds only go forward")
    _refused(server.evaluate("b", x0, server.config(0, INITIAL_FRAME)), "rounds only go forward")
    # the site's round-0 upload frame named for round 2: not where round 2's model is
    _refused(server.evaluate("a", aggregate2, server.config(2, frame)), "frame of its upload")
    # the honest next step still works
    assert not server.evaluate("a", aggregate2, server.config(2, frame2)).has_error()
    server.honest_round(2, aggregate2, frame2)
    # past the last round: nothing to train
    _refused(server.train("a", aggregate2, server.config(3, frame2)), "outside")
    server.assert_nothing_leaked()


def test_secure_aggregation_attempts_go_up():
    server = Adversary(_settings(privacy="secagg"))
    server.agree_keys()
    x0 = server.initial_model()
    config = server.config(0, INITIAL_FRAME)
    assert not server.train("a", x0, config).has_error()
    _refused(server.train("a", x0, config), "per attempt")
    # a retry without a site: fresh masks, another frame (the attempt is in the frame's name)
    retry = dataclasses.replace(config, participants=["a", "b"], attempt=1)
    assert not server.train("a", x0, retry).has_error()
    assert frame_id(x0, retry) != frame_id(x0, config)
    _refused(server.train("a", x0, dataclasses.replace(retry, attempt=0)), "per attempt")
    _refused(server.train("c", x0, dataclasses.replace(config, participants=["a", "b"])), "once")
    server.assert_nothing_leaked()


@pytest.mark.parametrize(
    "change",
    [
        {"sample_dp_epsilon": 0.0},
        {"sample_dp_epsilon": 1e4},
        {"sample_dp_clipping_norm": 1e3},
        {"dp_delta": 0.5},
        {"max_rounds": 1},
        {"batch_size": 40},
    ],
    ids=lambda change: ",".join(f"{k}={v}" for k, v in change.items()),
)
def test_sample_dp_cannot_be_weakened_by_message(change):
    """A site under sample-level DP: less noise by message is refused; replies hold no loss."""
    server = Adversary(_settings(sample_dp_epsilon=2.0))
    x0 = server.initial_model()
    _refused(server.train("a", x0, server.config(0, INITIAL_FRAME, **change)), "refused")
    reply = server.train("a", x0, server.config(0, INITIAL_FRAME))
    assert not reply.has_error(), reply.error.reason
    metrics = content_to_update(reply.content).metrics
    assert set(metrics) == {"dp_epsilon", "dp_noise_multiplier"}
    assert 0 < metrics["dp_epsilon"] < 2.0
    # the noise secret stays in the site's state and in no reply
    secret = SiteState.from_mapping(server.contexts["a"].state[PROTOCOL_STATE]).dp_secret
    answered = [r for r in server.replies if r.has_content()]
    assert len(secret) == 64 and all(secret not in str(r.content) for r in answered)
    frame = frame_id(x0, server.config(0, INITIAL_FRAME))
    score = server.evaluate("b", x0, server.config(1, frame))
    assert content_to_update(score.content).metrics == {"n_val": 0.0}
    server.assert_nothing_leaked()


def _loopback_run(settings, grid=None, checkpoint_dir=None, resume=False):
    module = _module()
    if resume:
        server = FederatedServer.from_checkpoint(
            checkpoint_dir, settings, KEY.fingerprint, KEY.version
        )
    else:
        initial = frames_for(KEY).encode(get_shared_parameters(module), INITIAL_FRAME)
        server = FederatedServer(
            initial, settings, KEY.fingerprint, KEY.version, checkpoint_dir=checkpoint_dir
        )
    if grid is None:
        table = SimulationSites(
            copy.deepcopy(module),
            _sites(),
            keys=dict.fromkeys(NAMES, KEY),
            num_threads=torch.get_num_threads(),
            config=_settings(),
        )
        grid = LoopbackGrid(make_client_app(table), len(NAMES))
    app = make_server_app(lambda context: server, expected_sites=len(NAMES), progress_bar=False)
    app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return server, grid


def test_resume_with_the_sites_state_kept_equals_the_uninterrupted_run(tmp_path):
    """The sites keep their state (same Contexts) while the server stops and resumes."""
    straight, _ = _loopback_run(_settings())
    first, grid = _loopback_run(_settings(max_rounds=1), checkpoint_dir=tmp_path)
    assert first.next_round == 1
    resumed, _ = _loopback_run(_settings(), grid=grid, checkpoint_dir=tmp_path, resume=True)
    assert not any(r.has_error() for r in grid.replies)
    assert resumed.next_round == 3 and resumed.frame == straight.frame
    for name in straight.parameters:
        assert_same_weights(resumed.parameters[name], straight.parameters[name], err_msg=name)


def test_sites_not_sampled_still_evaluate_and_train_later():
    """fraction < 1: a site that sat a round out cannot know the new frame, and still takes part."""
    module = _module()
    server = run_local(module, _sites(), _settings(fraction=0.4), progress_bar=False, key=KEY)
    history = server.history()
    assert server.next_round == 3
    # every site scored every round's model; two of three trained in each round
    assert (history.groupby("round")["site"].nunique() == len(NAMES)).all()
    assert (history.groupby("round")["accepted"].sum() == 2).all()
    # site a sat rounds 0 and 1 out and trained in round 2, from a frame it never computed
    assert history.loc[history["site"] == "a", "accepted"].tolist() == [False, False, True]


def test_feature_moments_are_sent_once_and_never_unmasked_under_secure_aggregation(key):
    """A server asking the moments under several participant lists could solve for each site's."""
    from scinfl.federated import FederationConfig, SiteData, SiteProtocol, SiteRuntime
    from scinfl.federated._site_runtime import RefusedMessageError

    x = np.random.default_rng(0).normal(25, 3, (20, 6)).astype(np.float32)
    module = KeyedVAE(n_input=6, gene_likelihood="normal", key_mode=None)
    federation = FederationConfig.from_settings(max_rounds=2, privacy="secagg", secret_frames=True)
    runtime = SiteRuntime(
        module, SiteData.from_arrays("a", x), key=key, federation=federation, secret_frames=True
    )
    protocol = SiteProtocol(runtime)
    with pytest.raises(RefusedMessageError, match="over 2 or more participants"):
        protocol.moments(["a"])  # alone, its mask would be none
    with pytest.raises(RefusedMessageError, match="has not installed"):
        protocol.moments(["a", "b"])  # no key agreement yet: no masks
    peer = advertise_key(generate_private_key(), "b", key)
    protocol.install_peer_keys([protocol.advertise_key(), peer])
    masked = protocol.moments(["a", "b"])
    assert all(value.dtype == np.uint64 for value in masked.parameters.values())
    with pytest.raises(RefusedMessageError, match="sent its moments already"):
        protocol.moments(["a", "c"])


def test_key_agreement_messages_that_do_not_fit_are_refused():
    """Keys the server swaps, drops or adds, a second list, a participant without a key."""
    _refused(Adversary(_settings()).advertisement("a"), "secure aggregation off")
    server = Adversary(_settings(privacy="secagg"))
    _refused(server.relay("a", []), "advertised no public key")
    ads = [record_to_advertisements(server._content(s))[0] for s in NAMES]
    # asked again, a site advertises the same key (one key pair per run)
    assert record_to_advertisements(server._content("a"))[0] == ads[0]
    # a server without the key substitutes b's public key with one of its own: the tag fails
    own = advertise_key(generate_private_key(), "b", scinfl.Key.generate())
    _refused(server.relay("a", [ads[0], own, ads[2]]), "tag")
    # b's key and tag relayed as c's
    _refused(server.relay("a", [ads[0], ads[1], dataclasses.replace(ads[1], site="c")]), "tag")
    _refused(server.relay("a", [ads[0], ads[1], ads[1]]), "twice")
    _refused(server.relay("a", ads[1:]), "own public key")
    # the honest list, twice (a resend), then another list: refused
    assert not server.relay("a", ads).has_error()
    assert not server.relay("a", ads).has_error()
    _refused(server.relay("a", ads[:2]), "other public keys")
    extra = advertise_key(generate_private_key(), "d", KEY)  # only a key holder could
    _refused(server.relay("a", [*ads, extra]), "other public keys")
    # a participant list naming a site whose key a did not install
    x0 = server.initial_model()
    config = server.settings.client_config(0, [*NAMES, "d"], frame=INITIAL_FRAME)
    _refused(server.train("a", x0, config), "has not installed", "'d'")
    assert not server.train("a", x0, server.config(0, INITIAL_FRAME)).has_error()
    # no reply carries the site's private key
    private = SiteState.from_mapping(server.contexts["a"].state[PROTOCOL_STATE]).private_key
    assert len(private) == 64
    for reply in server.replies:
        assert reply.has_error() or private not in repr(reply.content)
    server.assert_nothing_leaked()


def test_models_of_another_kind_are_refused_before_they_are_read():
    """A huge, mistyped or non-finite model is refused by its names, shapes and values alone."""
    server = Adversary(_settings())
    x0 = server.initial_model()
    config = server.config(0, INITIAL_FRAME)
    huge = {**x0, "extra": np.zeros(4_000_000, np.float32)}  # no frame is drawn for it
    _refused(server.train("a", huge, config), "unexpected", "extra")
    name = next(n for n, v in x0.items() if np.asarray(v).ndim == 2)
    for dtype in (np.int32, np.float16, np.bool_, np.complex64):
        crafted = {**x0, name: np.asarray(x0[name]).astype(dtype)}
        _refused(server.train("a", crafted, config), name, "would be cast")
    poisoned = {**x0, name: np.full_like(x0[name], np.nan)}
    _refused(server.train("a", poisoned, config), name, "NaN or infinite")
    # refused messages leave the site as it was: the honest model is still answered
    assert not server.train("a", x0, config).has_error()
    server.assert_nothing_leaked()


@pytest.mark.parametrize("value", [0.0, False, -0.0, "0"])
def test_instructions_of_another_type_are_refused(value):
    """``0 == 0.0 == False``, but the seed and the frame's name are formed from the text."""
    server = Adversary(_settings())
    x0 = server.initial_model()
    record = config_to_record(server.config(0, INITIAL_FRAME))
    record["round"] = value
    content = RecordDict({PARAMETERS: parameters_to_record(x0), CONFIG: record})
    reply = server.send("a", "train", content)
    assert reply.has_error() and "round=" in reply.error.reason, reply.error.reason
    assert not server.train("a", x0, server.config(0, INITIAL_FRAME)).has_error()


def test_messages_without_their_records_and_flags_of_another_type_are_refused():
    server = Adversary(_settings())
    x0 = server.initial_model()
    only_model = RecordDict({PARAMETERS: parameters_to_record(x0)})
    assert "'config' record" in server.send("a", "train", only_model).error.reason
    only_config = RecordDict({CONFIG: config_to_record(server.config(0, INITIAL_FRAME))})
    assert "'parameters' record" in server.send("a", "train", only_config).error.reason
    reply = server.query("b", **{WANT_PARAMETERS: True, IN_SECRET_FRAME: "no"})
    assert reply.has_error() and "True or False" in reply.error.reason


def test_no_model_is_decoded_from_any_earlier_upload_frame():
    """Sitting out a round does not free the frame of an older upload."""
    server = Adversary(_settings(max_rounds=5))
    x0 = server.initial_model()
    x1, f1, updates0 = server.honest_round(0, x0, INITIAL_FRAME)
    x2, f2, _ = server.honest_round(1, x1, f1)
    x3, f3, _ = server.honest_round(2, x2, f2, sites=("b", "c"))  # site a sits out
    own_round0 = updates0[0].parameters  # site a's upload, in frame f1
    _refused(server.evaluate("a", own_round0, server.config(3, f1)), "earlier uploads")
    _refused(server.train("a", own_round0, server.config(3, f1)), "earlier uploads")
    assert not server.train("a", x3, server.config(3, f3)).has_error()
    server.assert_nothing_leaked()


def test_a_feature_scale_the_sites_own_rows_contradict_is_refused(key):
    """Scale 0 (never observed) for features the site sees vary would train it on nothing."""
    from scinfl.federated import FederationConfig, SiteData, SiteProtocol, SiteRuntime
    from scinfl.federated._site_runtime import RefusedMessageError

    x = np.random.default_rng(0).normal(25, 3, (20, 6)).astype(np.float32)
    x[:, 5] = np.nan  # never observed here: a scale of 0 is the federation's to give
    module = KeyedVAE(n_input=6, gene_likelihood="normal", key_mode=None)
    federation = FederationConfig.from_settings(max_rounds=2, secret_frames=True)
    runtime = SiteRuntime(
        module, SiteData.from_arrays("a", x), key=key, federation=federation, secret_frames=True
    )
    protocol = SiteProtocol(runtime)
    with pytest.raises(RefusedMessageError, match="scale 0 .* to 5 features"):
        protocol.set_feature_scale(np.full(6, 25.0), np.zeros(6))
    with pytest.raises(RefusedMessageError, match="finite"):
        protocol.set_feature_scale(np.full(6, np.inf), np.ones(6))
    assert not protocol.state.feature_scale
    protocol.set_feature_scale(np.full(6, 25.0), np.array([3.0] * 5 + [0.0]))
    assert module.feature_observed.tolist() == [True] * 5 + [False]


def test_float_instructions_given_as_integers_name_the_same_frame():
    """``kl_weight=1`` equals ``1.0`` but hashed as text it named another frame."""
    from scinfl.federated import ClientConfig
    from scinfl.federated.flower._records import record_to_config

    honest = ClientConfig(round=0, kl_weight=1.0, mu=0.0)
    record = config_to_record(honest)
    record["kl_weight"], record["mu"] = 1, 0
    received = record_to_config(record)
    assert received == honest and isinstance(received.kl_weight, float)
    x = {"w": np.zeros(2, np.float32)}
    assert frame_id(x, received) == frame_id(x, honest)
    numpy_typed = ClientConfig(round=np.int64(0), kl_weight=np.float32(1.0), mu=np.float64(0))
    assert frame_id(x, numpy_typed) == frame_id(x, honest)
