"""Pairwise key agreement for secure aggregation: one shared secret per pair of sites.

Each site draws an ephemeral X25519 key pair per run, keeps the private key in its protocol
state and advertises the public key, with an HMAC tag under the federation's key that binds it
to the site's name (:func:`advertise_key`). The server relays every advertisement to every
site; each site checks the tags (:func:`verify_advertisements`) and derives, with every peer,
a secret only the two of them hold: X25519 Diffie-Hellman, then HKDF-SHA256 over the pair's
names (:func:`pair_secrets`). The masks of :func:`~scinfl.federated.mask_update` come from
these secrets, so a site's upload is unmasked only by the sites it shares masks with: the
server with ``t`` colluding sites learns the sum of the other sites' updates, nothing more.

The tag keeps a server *without* the key from substituting public keys (a man in the middle).
A server that colludes with a key holder can forge tags, substitute a site's key in what it
relays and then unmask that site, unless the sites pin each other's long-term identities: with
a :class:`~scinfl.federated.Roster`, each advertisement is also signed with the site's
:class:`~scinfl.federated.SiteIdentity`, and a site accepts only keys signed by the sites they
are advertised for.

Built on the ``cryptography`` package (X25519, HKDF), as Flower's SecAgg+ is. Flower's own
helpers (``flwr.common.secure_aggregation.crypto.symmetric_encryption.generate_shared_key``,
``flwr.supercore.primitives.asymmetric.generate_key_pairs``) are not used: they take NIST
curve keys in PEM (``ec.ECDH``, SECP384R1), live in the optional Flower dependency while the
local engine must work without it, and their HKDF binds no context (salt and info ``None``).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from scinfl.key import Key

from ._site_identity import Roster, SiteIdentity

_RAW = {"encoding": serialization.Encoding.Raw}


@dataclass(frozen=True)
class KeyAdvertisement:
    """One site's public key for the run, with its tag under the federation's key.

    Parameters
    ----------
    site
        The site's name.
    public_key
        Its X25519 public key (32 bytes, hex).
    tag
        HMAC-SHA256 of the site's name and public key under the federation's key (hex).
    signature
        Ed25519 signature of the same by the site's :class:`~scinfl.federated.SiteIdentity`
        (hex; empty when the site holds no identity).

    Examples
    --------
    >>> ad = advertise_key(generate_private_key(), "a", Key.generate())
    >>> len(ad.public_key), ad.site
    (64, 'a')
    """

    site: str
    public_key: str
    tag: str
    signature: str = ""


def generate_private_key() -> str:
    """A fresh X25519 private key, hex (it stays in the site's state and never leaves it).

    Returns
    -------
    The raw 32-byte private key as 64 hex characters.

    Examples
    --------
    >>> len(generate_private_key())
    64
    """
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(
        format=serialization.PrivateFormat.Raw,
        encryption_algorithm=serialization.NoEncryption(),
        **_RAW,
    )
    return raw.hex()


def _private(private_key: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(private_key))


def public_key_of(private_key: str) -> str:
    """The public key (hex) of a private key of :func:`generate_private_key`.

    Parameters
    ----------
    private_key
        An X25519 private key, hex.

    Returns
    -------
    Its raw 32-byte public key as 64 hex characters.

    Examples
    --------
    >>> private = generate_private_key()
    >>> public_key_of(private) == public_key_of(private)
    True
    """
    public = _private(private_key).public_key()
    return public.public_bytes(format=serialization.PublicFormat.Raw, **_RAW).hex()


def _label(site: str, public_key: str) -> bytes:
    return "\x1f".join(["scinfl/secagg-public-key", site, public_key]).encode()


def _tag(key: Key, site: str, public_key: str) -> str:
    label = _label(site, public_key)
    return hmac.new(key.secret_for("secure-aggregation"), label, hashlib.sha256).hexdigest()


def advertise_key(
    private_key: str, site: str, key: Key, identity: SiteIdentity | None = None
) -> KeyAdvertisement:
    """The advertisement of ``site``'s public key: the key, its tag under ``key``, its signature.

    With an ``identity`` (the site's own), the advertisement is signed with it.

    Parameters
    ----------
    private_key
        The site's private key for the run (:func:`generate_private_key`).
    site
        The site's name (bound into the tag and the signature).
    key
        The federation's key, which the tag is made under.
    identity
        The site's long-term :class:`~scinfl.federated.SiteIdentity`, to sign with
        (``None``: unsigned).

    Returns
    -------
    The advertisement to send to the server.

    Raises
    ------
    ValueError
        When ``identity`` belongs to another site.

    Examples
    --------
    >>> key = Key.generate()
    >>> ad = advertise_key(generate_private_key(), "a", key)
    >>> verify_advertisements([ad], key) == {"a": ad.public_key}
    True
    """
    public_key = public_key_of(private_key)
    signature = ""
    if identity is not None:
        if identity.site != site:
            raise ValueError(
                f"The identity of site {identity.site!r} cannot sign for site {site!r}: give "
                "each site its own identity file."
            )
        signature = identity.sign(_label(site, public_key))
    return KeyAdvertisement(site, public_key, _tag(key, site, public_key), signature)


def verify_advertisements(
    advertisements: Sequence[KeyAdvertisement], key: Key, roster: Roster | None = None
) -> dict[str, str]:
    """Each site's public key, once every tag (and, with a ``roster``, signature) is checked.

    Parameters
    ----------
    advertisements
        Every site's advertisement, as relayed by the server.
    key
        The federation's key (checks the tags).
    roster
        The federation's pinned site identities (checks the signatures); ``None``: tags only.

    Returns
    -------
    Site name to public key (hex).

    Raises
    ------
    ValueError
        When a tag is wrong (a key substituted by someone without the federation's key, or a
        site under another key), a site is named twice, or, with a ``roster``, a site is not
        in it or its key is not signed by its identity (a key substituted by a key holder).

    Examples
    --------
    >>> key = Key.generate()
    >>> ad = advertise_key(generate_private_key(), "a", key)
    >>> verify_advertisements([KeyAdvertisement("b", ad.public_key, ad.tag)], key)
    Traceback (most recent call last):
    ...
    ValueError: The public key advertised for site 'b' does not carry the federation key's tag: it was substituted, or the site holds another key. Check that every site holds the federation's current key.
    """
    keys: dict[str, str] = {}
    for ad in advertisements:
        if ad.site in keys:
            raise ValueError(f"Site {ad.site!r} is advertised twice; each site has one key.")
        if not hmac.compare_digest(ad.tag, _tag(key, ad.site, ad.public_key)):
            raise ValueError(
                f"The public key advertised for site {ad.site!r} does not carry the federation "
                "key's tag: it was substituted, or the site holds another key. Check that every "
                "site holds the federation's current key."
            )
        if roster is not None and not roster.verify(
            ad.site, _label(ad.site, ad.public_key), ad.signature
        ):
            raise ValueError(
                f"The public key advertised for site {ad.site!r} is not signed by the identity "
                "the roster pins for it: it was substituted (by someone holding the federation's "
                "key), the site runs without its identity file, or the roster is not the "
                "federation's. Give every site its `identity-path` and the same `roster-path`."
            )
        keys[ad.site] = ad.public_key
    return keys


def pair_secrets(
    private_key: str, site: str, peers: Mapping[str, str], participants: Sequence[str]
) -> dict[str, bytes]:
    """The 32-byte secret ``site`` shares with each other participant: X25519, then HKDF.

    Parameters
    ----------
    private_key
        The site's private key (:func:`generate_private_key`).
    site
        The site's name.
    peers
        Every site's public key, by name (:func:`verify_advertisements`).
    participants
        The sites to derive a secret with (``site`` itself is skipped).

    Raises
    ------
    KeyError
        When a participant has no public key in ``peers``.

    Returns
    -------
    Peer name to the 32-byte secret shared with it (the same at both ends).

    Examples
    --------
    >>> key = Key.generate()
    >>> private = {s: generate_private_key() for s in "ab"}
    >>> peers = {s: public_key_of(p) for s, p in private.items()}
    >>> pair_secrets(private["a"], "a", peers, "ab")["b"] == pair_secrets(private["b"], "b", peers, "ab")["a"]
    True
    """
    own = _private(private_key)
    secrets = {}
    for other in participants:
        if other == site:
            continue
        if other not in peers:
            raise KeyError(other)
        shared = own.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(peers[other])))
        pair = "\x1f".join(["scinfl/secagg-pair", *sorted((site, other))]).encode()
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=pair)
        secrets[other] = hkdf.derive(shared)
    return secrets
