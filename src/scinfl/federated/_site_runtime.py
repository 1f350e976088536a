"""One site's side of a round, whatever carries the messages: train, evaluate, initial weights.

The Flower ``ClientApp`` and the in-process transport of :func:`~scinfl.federated.run_local`
both answer the server through a :class:`SiteProtocol`, so the two engines compute the same
thing and refuse the same messages. The protocol keeps each site's state between messages
(:class:`SiteState`): which round's model it holds, in which secret frame, and where its last
upload went. A server without the key chooses every message a site receives; the site answers
only the messages the honest protocol sends (see :class:`SiteProtocol`), so it is no
decryption oracle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from secrets import token_hex
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from scinfl.key import Key
from scinfl.module import feature_moments, scale_from_moments

from ._client import ClientConfig, ClientUpdate, client_evaluate, client_update
from ._config import FederationConfig
from ._key_agreement import (
    KeyAdvertisement,
    advertise_key,
    generate_private_key,
    pair_secrets,
    public_key_of,
    verify_advertisements,
)
from ._parameters import (
    Parameters,
    check_parameters_fit,
    get_shared_parameters,
    site_state_names,
)
from ._sample_dp import noise_seed
from ._secret_frames import INITIAL_FRAME, frame_id, frames_for, open_parameters, parameters_digest
from ._secure_aggregation import mask_update, protect_update, self_mask_seed
from ._site_data import SiteData
from ._site_identity import Roster, SiteIdentity

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

logger = logging.getLogger(__name__)


class RefusedMessageError(ValueError):
    """A site refused a server message that the honest protocol does not send.

    Examples
    --------
    >>> issubclass(RefusedMessageError, ValueError)
    True
    """


@dataclass
class SiteRuntime:
    """What one site needs to answer the server: its module (key set), its data, its key.

    The key lives in the module's non-persistent buffers (and in ``key``, for secure
    aggregation's masks and secret frames); only its fingerprint and version are ever sent.

    Parameters
    ----------
    module
        The site's module with the federation's key set.
    site
        The site's data.
    key_fingerprint, key_version
        Public identity of the site's key, sent with every reply.
    key
        The key itself (never sent).
    secret_frames
        Whether the parameters travel in secret frames: the site's own setting (its
        federation settings, or the ``secret-frames`` entry of its run configuration), never a
        message's.
    federation
        The federation's settings as the site holds them: the instructions of every round are
        checked against them (:class:`SiteProtocol`).
    initial
        The shared parameters the site was built with (default: the module's now), the only
        parameters it ever sends in a reply to a ``query``.
    identity, roster
        The site's long-term identity and the federation's roster of identities
        (:class:`~scinfl.federated.Roster`), both or neither: under secure aggregation the
        site then signs its public key and accepts only peers' keys signed by the identities
        the roster pins, so that no one holding the federation's key can substitute them.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> runtime = SiteRuntime(KeyedVAE(n_input=4, key_mode=None), SiteData.from_arrays("a", np.ones((10, 4))))
    >>> runtime.site.name
    'a'
    """

    module: nn.Module
    site: SiteData
    key_fingerprint: str | None = None
    key_version: int | None = None
    key: Key | None = field(default=None, repr=False)
    secret_frames: bool = False
    federation: FederationConfig | None = None
    initial: Parameters | None = field(default=None, repr=False)
    identity: SiteIdentity | None = field(default=None, repr=False)
    roster: Roster | None = None

    def __post_init__(self) -> None:
        if self.initial is None:
            self.initial = get_shared_parameters(self.module)
        self._check_identity()
        if self.federation is not None and bool(self.federation.privacy.secret_frames) != bool(
            self.secret_frames
        ):
            raise ValueError(
                f"Site {self.site.name!r}: secret_frames={self.secret_frames} but its federation "
                f"settings say secret_frames={self.federation.privacy.secret_frames}."
            )

    def _check_identity(self) -> None:
        if (self.identity is None) != (self.roster is None):
            raise ValueError(
                f"Site {self.site.name!r}: an identity and a roster go together (the identity "
                "signs this site's public key, the roster checks the peers'): give both, or "
                "neither."
            )
        if self.roster is None:
            return
        pinned = self.roster.public_keys.get(self.site.name)
        if self.identity.site != self.site.name or pinned != self.identity.public_key:
            raise ValueError(
                f"Site {self.site.name!r}: its identity file (site {self.identity.site!r}) is not "
                "the one the roster pins for it. Give the site its own identity file and the "
                "federation's roster."
            )


def site_train(
    runtime: SiteRuntime,
    received: Parameters,
    config: ClientConfig,
    opened: Parameters | None = None,
    secrets: Mapping[str, bytes] | None = None,
    dp_seed: int | None = None,
    self_seed: bytes | None = None,
    digest: str | None = None,
) -> ClientUpdate:
    """Train from what the server sent; the update as it goes back (framed, masked).

    Parameters
    ----------
    runtime
        The site.
    received
        The global parameters as sent (in the secret frame ``config.frame`` under frames).
    config
        The round's instructions.
    opened
        ``received`` already decoded from its frame (a caller playing several sites decodes
        once per round).
    secrets
        Under secure aggregation, the secret the site shares with each other participant
        (:func:`~scinfl.federated.pair_secrets`).
    dp_seed
        Under sample-level DP, the seed of the site's sampling and noise
        (:func:`~scinfl.federated.client_update`).
    self_seed
        Under secure aggregation, the seed of the site's self mask in this attempt.
    digest
        :func:`~scinfl.federated.parameters_digest` of ``received``, when the caller has it
        (it names the upload's frame; a wide model is then hashed once per message).

    Returns
    -------
    The site's update as it is sent: in its secret frame and/or masked, as ``config`` asks.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> runtime = SiteRuntime(KeyedVAE(n_input=4, key_mode=None), SiteData.from_arrays("a", np.ones((10, 4))))
    >>> site_train(runtime, get_shared_parameters(runtime.module), ClientConfig(round=0)).n
    9
    """
    if opened is None:
        opened = open_parameters(received, runtime.key, config)
    update = client_update(
        runtime.module,
        runtime.site,
        opened,
        config,
        key_fingerprint=runtime.key_fingerprint,
        key_version=runtime.key_version,
        dp_seed=dp_seed,
    )
    return protect_update(update, runtime.key, config, received, secrets, self_seed, digest)


def site_evaluate(
    runtime: SiteRuntime,
    received: Parameters,
    config: ClientConfig | None = None,
    opened: Parameters | None = None,
) -> ClientUpdate:
    """Validation metrics of what the server sent, as an update without parameters.

    Parameters
    ----------
    runtime
        The site.
    received
        The global parameters as sent.
    config
        The instructions sent with them (``None``: ``received`` is plain, no frame).
    opened
        ``received`` already decoded from its frame, if the caller has it.

    Returns
    -------
    An update with ``n`` the validation rows, no parameters and the validation metrics
    (:func:`~scinfl.federated.client_evaluate`); under sample-level DP, ``n_val = 0`` only
    (no loss leaves the site).

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> runtime = SiteRuntime(KeyedVAE(n_input=4, key_mode=None), SiteData.from_arrays("a", np.ones((10, 4))))
    >>> site_evaluate(runtime, get_shared_parameters(runtime.module)).metrics["n_val"]
    1.0
    """
    if config is not None and config.sample_dp_epsilon > 0:
        # under sample-level DP no loss leaves the site (they are not covered by the noise)
        metrics = {"n_val": 0.0}
    else:
        if opened is None:
            opened = received if config is None else open_parameters(received, runtime.key, config)
        metrics = client_evaluate(runtime.module, runtime.site, opened)
    return ClientUpdate(
        site=runtime.site.name,
        n=runtime.site.n_val,
        parameters={},
        metrics=metrics,
        key_fingerprint=runtime.key_fingerprint,
        key_version=runtime.key_version,
    )


def site_parameters(runtime: SiteRuntime, in_secret_frame: bool = False) -> Parameters:
    """The shared parameters the site was built with (``runtime.initial``), to start from.

    Never what the module holds now: after a train or evaluate step that is a model decoded
    from a secret frame.

    Parameters
    ----------
    runtime
        The site.
    in_secret_frame
        Send them in the initial secret frame (needs ``runtime.key``).

    Returns
    -------
    A copy of the site's initial shared parameters.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> runtime = SiteRuntime(KeyedVAE(n_input=4, key_mode=None), SiteData.from_arrays("a", np.ones((10, 4))))
    >>> "px_r" in site_parameters(runtime)
    True
    """
    parameters = {name: value.copy() for name, value in runtime.initial.items()}
    if in_secret_frame:
        parameters = frames_for(runtime.key).encode(parameters, INITIAL_FRAME)
    return parameters


#: Round label of the feature-moments step of secure aggregation (before round 0: its masks
#: are never those of a training round).
MOMENTS_ROUND = -1


@dataclass
class SiteState:
    """What a site remembers between messages (small: it travels in Flower's ``context.state``).

    Parameters
    ----------
    round
        Round of the latest global model the site accepted (``-1``: none yet).
    frame, digest
        That model's secret frame and the hash of its tensors as sent
        (:func:`~scinfl.federated.parameters_digest`): a round has one global model.
    trained_round, attempt
        Round (``-1``: none) and secure-aggregation attempt of the site's last train step.
    upload_frame
        The secret frame of its last upload: the frame of the next round's global model.
    upload_frames
        The secret frames of all its uploads in this run (space-separated): no model is
        decoded from one of them but the next round's from the last.
    moments_sent
        Whether the site has sent its feature moments (once: see :meth:`SiteProtocol.moments`).
    feature_scale
        Whether the federation's feature scale was set (before any model: see
        :meth:`SiteProtocol.set_feature_scale`).
    private_key
        The site's X25519 private key for secure aggregation in this run (hex; drawn by
        :meth:`SiteProtocol.advertise_key`, never sent).
    peer_keys
        Every site's public key as the site installed them (JSON object by site name;
        :meth:`SiteProtocol.install_peer_keys`).
    dp_secret
        Under sample-level DP, the secret that seeds the site's sampling and noise in every
        round (hex; drawn at its first train step, never sent): a round asked again gives the
        same noisy update.
    self_secret
        Under secure aggregation, the secret of the site's self masks (hex; drawn at its first
        masked upload; only the seed of an aggregated attempt is ever sent).
    participants
        The participants of its last masked upload (JSON list).
    revealed_round
        The last round whose self mask it revealed: that round is aggregated, and the site
        takes part in no other attempt of it.

    Examples
    --------
    >>> SiteState.from_mapping(SiteState(round=2).to_dict()).round
    2
    """

    round: int = -1
    frame: str = ""
    digest: str = ""
    trained_round: int = -1
    attempt: int = -1
    upload_frame: str = ""
    upload_frames: str = ""
    moments_sent: bool = False
    feature_scale: bool = False
    private_key: str = field(default="", repr=False)
    peer_keys: str = ""
    dp_secret: str = field(default="", repr=False)
    self_secret: str = field(default="", repr=False)
    participants: str = ""
    revealed_round: int = -1

    def to_dict(self) -> dict[str, Any]:
        """The state as a flat dictionary (e.g. for a Flower ``ConfigRecord``).

        Returns
        -------
        Field name to value (integers, strings, booleans only).

        Examples
        --------
        >>> SiteState(round=3).to_dict()["round"]
        3
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SiteState:
        """The state stored by :meth:`to_dict`.

        Parameters
        ----------
        values
            Field name to value; missing fields keep their defaults, unknown names are
            ignored, and values are cast to the fields' types.

        Returns
        -------
        The state.

        Examples
        --------
        >>> SiteState.from_mapping({"round": 2, "moments_sent": True, "other": 0})
        SiteState(round=2, frame='', digest='', trained_round=-1, attempt=-1, upload_frame='', upload_frames='', moments_sent=True, feature_scale=False, peer_keys='', participants='', revealed_round=-1)
        """
        return cls(
            **{
                f.name: type(f.default)(values[f.name])
                for f in dataclasses.fields(cls)
                if f.name in values
            }
        )


class SiteProtocol:
    """One site's side of the protocol: answers only the messages the honest server sends.

    The server (without the key) chooses every message; the site decides from its own
    settings (:attr:`SiteRuntime.federation`, :attr:`SiteRuntime.secret_frames`) and its state
    (:class:`SiteState`) whether a message fits, and refuses any other with a
    :class:`RefusedMessageError` naming what it refused:

    - **Instructions** must be those the site computes for the message's round from its own
      settings (:meth:`FederationConfig.client_config`): ``local_epochs``, ``lr``, ``eps``,
      ``batch_size``, ``weight_decay``, ``mu``, ``kl_weight``, ``seed``, secure aggregation
      and secret frames on or off. Only the round, the frame and, under secure aggregation,
      the participants (the site among them) and the attempt come from the server. Rounds
      lie in ``[0, max_rounds)`` for training, ``[0, max_rounds]`` for evaluation (the model
      after the last round is evaluated as the next round's).
    - **Rounds only go forward, each with one global model**: a model for a round before the
      site's latest is refused (replay); a second one for the same round must be the same
      tensors in the same frame.
    - **Frames** (under secret frames): round 0's model is in the initial frame and no other
      round's is. A site that trained in the previous round decodes only the frame its
      upload went to (every participant's upload goes to the same frame: the aggregate's).
      A site that did not (not sampled, new, or after a restart) cannot know the frame of the
      new global model and accepts the one named, but never its own last upload frame, and
      at most one model per round, rounds going forward: at most ``max_rounds + 1`` models
      ever. Evaluating returns a loss only, and any site may evaluate the new global model.
    - **Uploads**: one per round (under secure aggregation: one per attempt, attempts going
      up), in the frame named by the model, its frame and the instructions
      (:func:`~scinfl.federated.frame_id`): never two uploads of one site in one frame.
    - **Parameters** are never returned after a model was received: a ``query`` for the
      initial parameters is answered (with the parameters the site was built with, in the
      initial frame when the site's frames are on) only before, and only if its
      ``in_secret_frame`` agrees with the site's setting.
    - **Feature moments and the feature scale** (continuous data) are answered and installed
      only before a model was received: sums per row of the training rows, masked when the
      site's settings have secure aggregation on.
    - **Public keys** (secure aggregation): the site advertises one key pair per run
      (:meth:`advertise_key`) and installs the peers' public keys once
      (:meth:`install_peer_keys`): every tag checked against the federation's key, its own
      key among them unchanged; a second, different list is refused, and so is a participant
      list naming a site whose key it did not install.

    Parameters
    ----------
    runtime
        The site.
    state
        Its state (a new site's by default); updated in place as messages are answered.

    Examples
    --------
    >>> import numpy as np
    >>> from scinfl.module import KeyedVAE
    >>> site = SiteData.from_arrays("a", np.ones((10, 4)))
    >>> federation = FederationConfig(max_rounds=2, batch_size=8)
    >>> protocol = SiteProtocol(SiteRuntime(KeyedVAE(n_input=4, key_mode=None), site, federation=federation))
    >>> initial = protocol.parameters()
    >>> protocol.train(initial, federation.client_config(0)).n
    9
    >>> protocol.parameters()
    Traceback (most recent call last):
    ...
    scinfl.federated._site_runtime.RefusedMessageError: Site 'a' refused a query for parameters: it has received a model already (round 0), and a site sends parameters only before.
    """

    def __init__(self, runtime: SiteRuntime, state: SiteState | None = None) -> None:
        self.runtime = runtime
        self.state = SiteState() if state is None else state

    def _refuse(self, what: str, why: str) -> RefusedMessageError:
        return RefusedMessageError(f"Site {self.runtime.site.name!r} refused {what}: {why}.")

    def parameters(self, in_secret_frame: bool = False) -> Parameters:
        """The site's initial parameters, for a ``query`` (see :func:`site_parameters`).

        Parameters
        ----------
        in_secret_frame
            Whether the server asks for them in the initial secret frame; must agree with the
            site's own setting.

        Returns
        -------
        The initial shared parameters.

        Raises
        ------
        RefusedMessageError
            After a model was received, or when ``in_secret_frame`` disagrees with the site.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl.module import KeyedVAE
        >>> vae = KeyedVAE(n_input=4, key_mode=None)
        >>> protocol = SiteProtocol(SiteRuntime(vae, SiteData.from_arrays("a", np.ones((10, 4)))))
        >>> sorted(protocol.parameters()) == sorted(get_shared_parameters(vae))
        True
        """
        what = "a query for parameters"
        if self.state.round >= 0:
            raise self._refuse(
                what,
                f"it has received a model already (round {self.state.round}), and a site sends "
                "parameters only before",
            )
        if bool(in_secret_frame) != bool(self.runtime.secret_frames):
            raise self._refuse(
                what,
                f"in_secret_frame={bool(in_secret_frame)}, but the site's own settings have "
                f"secret frames {'on' if self.runtime.secret_frames else 'off'}",
            )
        return site_parameters(self.runtime, bool(in_secret_frame))

    def moments(self, participants: Sequence[str] = ()) -> ClientUpdate:
        """The site's feature moments, for the federation's feature scale (``query``).

        Per-feature missing-aware count, sum and sum of squares of the training rows, each
        divided by their number ``n_k`` (so that FedAvg of the replies gives the pooled sums
        over the pooled number of rows), masked for secure aggregation when the site's
        settings have it on (``participants``: the sites whose masks cancel, this one among
        them). Answered once, only before any model was received and only for a model with a
        feature scale (:func:`~scinfl.federated.site_state_names`): answers under several
        participant lists would let the server solve for each site's moments, and a list of
        one site would leave them unmasked.

        Parameters
        ----------
        participants
            Under secure aggregation, the sites whose masks cancel in the sum.

        Returns
        -------
        An update with ``n = n_k`` and the parameters ``count``, ``sum`` and ``sumsq``
        (``(n_features,)`` each, divided by ``n_k``; masked under secure aggregation).

        Raises
        ------
        RefusedMessageError
            After a model was received, a second time, or for a model without a feature
            scale.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl.module import KeyedVAE
        >>> vae = KeyedVAE(n_input=3, key_mode=None, gene_likelihood="normal")
        >>> site = SiteData.from_arrays("a", np.full((10, 3), 2.0))
        >>> update = SiteProtocol(SiteRuntime(vae, site, federation=FederationConfig())).moments()
        >>> update.n, update.parameters["sum"].tolist()
        (9, [2.0, 2.0, 2.0])
        """
        what = "a query for feature moments"
        runtime = self.runtime
        if self.state.round >= 0:
            raise self._refuse(what, "it has received a model already")
        if self.state.moments_sent:
            raise self._refuse(what, "it has sent its moments already")
        if not site_state_names(runtime.module):
            raise self._refuse(what, "its model has no feature scale")
        site = runtime.site
        federation = runtime.federation
        if federation is not None and federation.privacy.sample_dp_epsilon is not None:
            logger.warning(
                "Site %r sends its feature sums (the location and scale of continuous data) "
                "without DP noise: sample_dp_epsilon covers the training steps, not these sums%s.",
                site.name,
                ""
                if federation.privacy.secure_aggregation
                else " (privacy='secagg' hides them in the sum)",
            )
        count, total, squares = feature_moments(site.feature_matrix(runtime.module))
        n = max(site.n_train, 1)
        update = ClientUpdate(
            site=site.name,
            n=n,
            parameters={"count": count / n, "sum": total / n, "sumsq": squares / n},
            key_fingerprint=runtime.key_fingerprint,
            key_version=runtime.key_version,
        )
        if federation is not None and federation.privacy.secure_aggregation:
            if site.name not in participants:
                raise self._refuse(what, f"the participants {list(participants)} omit it")
            self._check_sum_size(participants, what)
            secrets = self._secrets(participants, what)
            update = mask_update(update, secrets, MOMENTS_ROUND, participants)
        self.state.moments_sent = True
        return update

    def _secure(self) -> bool:
        federation = self.runtime.federation
        return federation is not None and federation.privacy.secure_aggregation

    def advertise_key(self) -> KeyAdvertisement:
        """The site's public key for this run, tagged with the federation's key (``query``).

        The key pair is drawn at the first advertisement and kept in the state for the run;
        asked again, the site advertises the same key.

        Returns
        -------
        The advertisement (signed too when the site holds an identity).

        Raises
        ------
        RefusedMessageError
            When the site's settings have secure aggregation off, or it holds no key.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl import Key
        >>> from scinfl.module import KeyedVAE
        >>> site = SiteData.from_arrays("a", np.ones((10, 4)))
        >>> runtime = SiteRuntime(KeyedVAE(n_input=4, key_mode=None), site, key=Key.generate(), federation=FederationConfig(privacy="secagg"))
        >>> protocol = SiteProtocol(runtime)
        >>> protocol.advertise_key() == protocol.advertise_key()
        True
        """
        if not self._secure() or self.runtime.key is None:
            raise self._refuse(
                "a query for its public key",
                "its own settings have secure aggregation off (or it holds no key)",
            )
        if not self.state.private_key:
            self.state.private_key = generate_private_key()
        return advertise_key(
            self.state.private_key, self.runtime.site.name, self.runtime.key, self.runtime.identity
        )

    def install_peer_keys(self, advertisements: Sequence[KeyAdvertisement]) -> None:
        """Install every site's public key (``query``), once their tags are checked.

        The site's own advertisement must be among them, unchanged; a second list is accepted
        only if it holds the same keys (a server resending the honest list).

        Parameters
        ----------
        advertisements
            Every site's advertisement, as the server relays them.

        Raises
        ------
        RefusedMessageError
            When the site advertised no key, a tag or signature is wrong, its own key is
            missing or changed, or another list was installed already.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl import Key
        >>> from scinfl.module import KeyedVAE
        >>> config, key, vae = FederationConfig(privacy="secagg"), Key.generate(), KeyedVAE(n_input=4, key_mode=None)
        >>> sites = {s: SiteProtocol(SiteRuntime(vae, SiteData.from_arrays(s, np.ones((10, 4))), key=key, federation=config)) for s in "ab"}
        >>> advertisements = [p.advertise_key() for p in sites.values()]
        >>> sites["a"].install_peer_keys(advertisements)
        >>> sites["a"].install_peer_keys(advertisements[1:])
        Traceback (most recent call last):
        ...
        scinfl.federated._site_runtime.RefusedMessageError: Site 'a' refused a list of public keys: the list does not carry its own public key ('a') as sent.
        """
        what = "a list of public keys"
        if not self._secure() or not self.state.private_key:
            raise self._refuse(what, "it has advertised no public key in this run")
        try:
            keys = verify_advertisements(advertisements, self.runtime.key, self.runtime.roster)
        except ValueError as err:
            raise self._refuse(what, str(err).rstrip(".")) from err
        name = self.runtime.site.name
        if keys.get(name) != public_key_of(self.state.private_key):
            raise self._refuse(
                what, f"the list does not carry its own public key ({name!r}) as sent"
            )
        installed = json.dumps(keys, sort_keys=True)
        if self.state.peer_keys and self.state.peer_keys != installed:
            raise self._refuse(
                what,
                "it installed other public keys in this run already; a run has one key per site",
            )
        self.state.peer_keys = installed

    def _check_sum_size(self, participants: Sequence[str], what: str) -> None:
        """Refuse a masked sum over fewer participants than the site's settings allow."""
        fewest = self.runtime.federation.privacy.secagg_min_participants
        if len(set(participants)) < fewest:
            raise self._refuse(
                what,
                f"its settings allow a secure sum over {fewest} or more participants "
                f"(secagg_min_participants), got {sorted(set(participants))}",
            )

    def _secrets(self, participants: Sequence[str], what: str) -> dict[str, bytes]:
        """The secrets shared with the other ``participants``; refused for an unknown site."""
        peers = json.loads(self.state.peer_keys) if self.state.peer_keys else {}
        unknown = sorted(set(participants) - set(peers))
        if unknown:
            raise self._refuse(
                what,
                f"the participants name sites whose public keys it has not installed: "
                f"{unknown} (secure aggregation needs the key agreement first)",
            )
        return pair_secrets(self.state.private_key, self.runtime.site.name, peers, participants)

    def set_feature_scale(self, loc: ArrayLike, scale: ArrayLike) -> None:
        """Install the federation's feature scale (``query``), before any model only.

        Parameters
        ----------
        loc, scale
            ``(n_features,)`` location and scale
            (:func:`~scinfl.module.scale_from_moments` of the pooled moments); a scale of 0
            marks a feature no site observed varying.

        Raises
        ------
        RefusedMessageError
            After a model was received, when the module refuses the values, or when a scale
            of 0 is given to a feature that varies in the site's own rows.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl.module import KeyedVAE
        >>> vae = KeyedVAE(n_input=3, key_mode=None, gene_likelihood="normal")
        >>> protocol = SiteProtocol(SiteRuntime(vae, SiteData.from_arrays("a", np.ones((10, 3)))))
        >>> protocol.set_feature_scale(np.zeros(3), np.ones(3))
        >>> protocol.state.feature_scale
        True
        """
        what = "a feature scale"
        if self.state.round >= 0:
            raise self._refuse(what, "it has received a model already")
        runtime = self.runtime
        own = scale_from_moments(*feature_moments(runtime.site.feature_matrix(runtime.module)))[1]
        try:
            scale = np.asarray(scale, dtype=np.float64)
            # a scale of 0 marks a feature no site observed twice with different values: the
            # site's own rows tell it that much of a scale sent in its stead
            contradicted = (
                np.flatnonzero((scale == 0) & (own > 0)) if scale.shape == own.shape else []
            )
            if len(contradicted):
                raise ValueError(
                    f"it gives scale 0 (not observed) to {len(contradicted)} features whose "
                    "values vary in the site's own rows (e.g. feature "
                    f"{int(contradicted[0])})"
                )
            runtime.module.set_feature_scale(loc, scale)
        except ValueError as err:
            raise self._refuse(what, str(err).rstrip(".")) from err
        self.state.feature_scale = True

    def train(
        self,
        received: Parameters,
        config: ClientConfig,
        opened: Parameters | None = None,
        digest: str | None = None,
    ) -> ClientUpdate:
        """:func:`site_train`, if the message fits; the state then records the upload.

        ``opened`` (``received`` decoded) and ``digest`` (its
        :func:`~scinfl.federated.parameters_digest`) come from a caller playing several sites
        in one process, which decodes and hashes each message once.

        Parameters
        ----------
        received
            The global parameters as sent.
        config
            The round's instructions; must be those the site's own settings give.
        opened, digest
            ``received`` decoded, and its digest, if the caller has them.

        Returns
        -------
        The site's update as it is sent (framed, masked as the round asks).

        Raises
        ------
        RefusedMessageError
            When the message does not fit (see the class's rules).

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl.module import KeyedVAE
        >>> config, vae = FederationConfig(max_rounds=1, batch_size=8), KeyedVAE(n_input=4, key_mode=None)
        >>> protocol = SiteProtocol(SiteRuntime(vae, SiteData.from_arrays("a", np.ones((10, 4))), federation=config))
        >>> update = protocol.train(protocol.parameters(), config.client_config(0))
        >>> update.n, protocol.state.trained_round
        (9, 0)
        """
        digest = self._check(received, config, "a train message", True, digest)
        state = self.state
        if state.trained_round == config.round and not (
            config.secure_aggregation and config.attempt > state.attempt
        ):
            raise self._refuse(
                "a train message",
                f"it trained in round {config.round} already (attempt {state.attempt}): one "
                "upload per round (under secure aggregation, per attempt, attempts going up)",
            )
        secure = config.secure_aggregation
        secrets = self_seed = None
        if secure:
            if config.round <= state.revealed_round:
                raise self._refuse(
                    "a train message",
                    f"it revealed its self mask of round {state.revealed_round}: that round "
                    "is aggregated, and an attempt more would let two sums of it be compared",
                )
            secrets = self._secrets(config.participants, "a train message")
            state.self_secret = state.self_secret or token_hex(32)
            secret = bytes.fromhex(state.self_secret)
            self_seed = self_mask_seed(secret, config.round, config.attempt)
        dp_seed = None
        if config.sample_dp_epsilon > 0:
            state.dp_secret = state.dp_secret or token_hex(32)
            dp_seed = noise_seed(bytes.fromhex(state.dp_secret), config.round)
        update = site_train(
            self.runtime, received, config, opened, secrets, dp_seed, self_seed, digest
        )
        self._accept(config, digest)
        state.trained_round, state.attempt = config.round, config.attempt
        state.participants = json.dumps(sorted(config.participants)) if secure else ""
        frames = self.runtime.secret_frames
        state.upload_frame = frame_id(received, config, digest) if frames else ""
        if frames:
            state.upload_frames = f"{state.upload_frames} {state.upload_frame}".strip()
        return update

    def reveal_self_mask(self, config: ClientConfig) -> bytes:
        """The seed of the self mask of the attempt ``config`` names, once per round (``query``).

        The server asks for it when every participant's upload of the attempt is in; the site
        answers only for its last upload (round, attempt and participants as it masked them),
        once per round, and trains in no other attempt of that round afterwards.

        Parameters
        ----------
        config
            The instructions of the attempt (round, attempt, participants).

        Returns
        -------
        The 32-byte seed (:func:`~scinfl.federated.self_mask_seed`).

        Raises
        ------
        RefusedMessageError
            When the site sent no masked upload, revealed this round already, or its last
            upload was another attempt.

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl import Key
        >>> from scinfl.module import KeyedVAE
        >>> config = FederationConfig.from_settings(max_rounds=1, batch_size=8, privacy="secagg", secagg_min_participants=2)
        >>> key, vae = Key.generate(), KeyedVAE(n_input=4, key_mode=None)
        >>> sites = {s: SiteProtocol(SiteRuntime(vae, SiteData.from_arrays(s, np.ones((10, 4))), key=key, federation=config)) for s in "ab"}
        >>> advertisements = [p.advertise_key() for p in sites.values()]
        >>> for p in sites.values():
        ...     p.install_peer_keys(advertisements)
        >>> sent = config.client_config(0, ["a", "b"])
        >>> _ = sites["a"].train(get_shared_parameters(vae), sent)
        >>> len(sites["a"].reveal_self_mask(sent))
        32
        """
        what = "a request for its self mask"
        state = self.state
        if not self._secure() or not state.self_secret:
            raise self._refuse(what, "it has sent no masked upload in this run")
        if config.round <= state.revealed_round:
            raise self._refuse(
                what, f"it revealed its self mask of round {state.revealed_round} already"
            )
        asked = (config.round, config.attempt, json.dumps(sorted(config.participants)))
        if asked != (state.trained_round, state.attempt, state.participants):
            raise self._refuse(
                what,
                f"its last masked upload was round {state.trained_round}, attempt "
                f"{state.attempt}, among {state.participants}; it reveals that one's only",
            )
        state.revealed_round = config.round
        return self_mask_seed(bytes.fromhex(state.self_secret), config.round, config.attempt)

    def evaluate(
        self,
        received: Parameters,
        config: ClientConfig | None,
        opened: Parameters | None = None,
        digest: str | None = None,
    ) -> ClientUpdate:
        """:func:`site_evaluate` (metrics only), if the message fits.

        ``opened`` and ``digest`` as for :meth:`train`.

        Parameters
        ----------
        received
            The global parameters as sent.
        config
            The instructions sent with them (their round and frame); ``None`` is refused.
        opened, digest
            ``received`` decoded, and its digest, if the caller has them.

        Returns
        -------
        An update with the validation metrics and no parameters.

        Raises
        ------
        RefusedMessageError
            When the message does not fit (see the class's rules).

        Examples
        --------
        >>> import numpy as np
        >>> from scinfl.module import KeyedVAE
        >>> config, vae = FederationConfig(max_rounds=1), KeyedVAE(n_input=4, key_mode=None)
        >>> protocol = SiteProtocol(SiteRuntime(vae, SiteData.from_arrays("a", np.ones((20, 4))), federation=config))
        >>> update = protocol.evaluate(protocol.parameters(), config.client_config(1))
        >>> update.n, sorted(update.metrics)
        (2, ['n_val', 'val_kl', 'val_loss', 'val_reconstruction'])
        """
        if config is None:
            raise self._refuse(
                "an evaluate message", "it carries no instructions (round and frame)"
            )
        digest = self._check(received, config, "an evaluate message", False, digest)
        update = site_evaluate(self.runtime, received, config, opened)
        self._accept(config, digest)
        return update

    def _accept(self, config: ClientConfig, digest: str) -> None:
        self.state.round, self.state.frame, self.state.digest = config.round, config.frame, digest

    def _check(
        self,
        received: Parameters,
        config: ClientConfig,
        what: str,
        train: bool,
        digest: str | None = None,
    ) -> str:
        """Refuse a model message that does not fit; the digest of its model otherwise."""
        self._check_instructions(config, what, train)
        try:  # before anything reads the model (hashing, secret frames drawn per axis)
            check_parameters_fit(self.runtime.module, received)
        except ValueError as err:
            raise self._refuse(what, str(err).rstrip(".")) from err
        state, round_, frame = self.state, config.round, config.frame
        digest = parameters_digest(received) if digest is None else digest
        if round_ < state.round:
            raise self._refuse(
                what,
                f"round {round_} is over for this site (it holds round {state.round}'s model): "
                "rounds only go forward",
            )
        if round_ == state.round:
            if frame != state.frame or digest != state.digest:
                raise self._refuse(
                    what,
                    f"it was sent round {round_}'s global model already (in frame "
                    f"{state.frame!r}); a round has one global model",
                )
            return digest
        if not self.runtime.secret_frames:
            return digest
        if (round_ == 0) != (frame == INITIAL_FRAME):
            raise self._refuse(
                what,
                f"round {round_}'s model named frame {frame!r}: the initial frame "
                f"{INITIAL_FRAME!r} is round 0's and no other round's",
            )
        if state.trained_round >= 0 and state.trained_round == round_ - 1:
            if frame != state.upload_frame:
                raise self._refuse(
                    what,
                    f"it trained in round {round_ - 1}, so round {round_}'s model is in the "
                    f"frame of its upload ({state.upload_frame!r}), not {frame!r} (a server on "
                    "another scinfl version names frames otherwise: give the server and every "
                    "site the same version)",
                )
        elif frame == state.upload_frame:
            raise self._refuse(
                what,
                f"frame {frame!r} holds its round {state.trained_round} upload, and only round "
                f"{state.trained_round + 1}'s model is decoded from it",
            )
        elif frame in state.upload_frames.split():
            raise self._refuse(
                what,
                f"frame {frame!r} holds one of its earlier uploads, and only the model of the "
                "round after it was decoded from it",
            )
        return digest

    def _check_instructions(self, config: ClientConfig, what: str, train: bool) -> None:
        federation = self.runtime.federation
        if federation is None:
            raise self._refuse(
                what,
                "it holds no federation settings to check the instructions against (give its "
                "SiteRuntime federation=)",
            )
        if bool(config.secret_frames) != bool(self.runtime.secret_frames):
            raise self._refuse(
                what,
                f"secret_frames={config.secret_frames}, but the site's own settings have secret "
                f"frames {'on' if self.runtime.secret_frames else 'off'}",
            )
        last = federation.max_rounds - 1 if train else federation.max_rounds
        if not 0 <= config.round <= last:
            raise self._refuse(what, f"round {config.round} is outside [0, {last}]")
        if (train and config.secure_aggregation) and (
            self.runtime.site.name not in config.participants
            or len(set(config.participants)) != len(config.participants)
        ):
            raise self._refuse(
                what, f"the participants {config.participants} do not name the site once"
            )
        if train and config.secure_aggregation:
            self._check_sum_size(config.participants, what)
        expected = federation.client_config(
            config.round,
            config.participants if train else (),
            config.attempt if train else 0,
            frame=config.frame,
        )
        if train and expected.secure_aggregation and config.attempt < 0:
            raise self._refuse(what, f"attempt {config.attempt} is negative")
        differences = [
            f"{f.name}={getattr(config, f.name)!r} (expected {getattr(expected, f.name)!r})"
            for f in dataclasses.fields(ClientConfig)
            if getattr(config, f.name) != getattr(expected, f.name)
        ]
        if differences:
            raise self._refuse(
                what,
                "its instructions differ from those the site's federation settings give for "
                f"round {config.round}: " + ", ".join(differences),
            )
