"""Long-term site identities, pinned out of band: who may advertise a site's public key.

Secure aggregation's key agreement relays every site's public key through the server. The tag
under the federation's key stops a server *without* the key from substituting one, but every
site holds that key: a server colluding with one site could forge tags, put keys of its own in
place of an honest site's peers and unmask that site. Pinned identities close that: each site
draws a long-term Ed25519 key pair once (:meth:`SiteIdentity.generate`), keeps the private key
(like the federation's key: a file with owner-only permissions) and hands its public key to the
coordinator, who sends every site the same :class:`Roster` of public keys by a channel the
server does not control (the way the federation's key itself travels). A site that holds a
roster signs its advertisements and accepts a list of public keys only if every key carries the
signature of the site it is advertised for; the coalition cannot sign for an honest site.

Ed25519 comes from the ``cryptography`` package, like the key agreement's X25519.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

_RAW = {"encoding": serialization.Encoding.Raw}
_IDENTITY_FORMAT = "scinfl-site-identity"
_ROSTER_FORMAT = "scinfl-site-roster"


def _read_json(path: Path, what: str, expected_format: str) -> dict:
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable scinfl {what} file: {error}.") from error
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        raise ValueError(f"{path} is not a scinfl {what} file (format {expected_format!r}).")
    return payload


def _public_hex(private: Ed25519PrivateKey) -> str:
    return private.public_key().public_bytes(format=serialization.PublicFormat.Raw, **_RAW).hex()


@dataclass(frozen=True)
class SiteIdentity:
    """A site's long-term signing key (Ed25519): private, kept at the site like the key file.

    Parameters
    ----------
    site
        The site's name, as the federation knows it.
    private_key
        The Ed25519 private key (32 bytes, hex); never sent.

    Examples
    --------
    >>> identity = SiteIdentity.generate("a")
    >>> Roster.from_identities([identity]).verify("a", b"hello", identity.sign(b"hello"))
    True
    """

    site: str
    private_key: str = field(repr=False)

    @classmethod
    def generate(cls, site: str) -> SiteIdentity:
        """A fresh identity for ``site`` (a non-empty name).

        Parameters
        ----------
        site
            The site's name, as the federation knows it.

        Returns
        -------
        The identity, with a new random private key.

        Raises
        ------
        ValueError
            When ``site`` is empty.

        Examples
        --------
        >>> identity = SiteIdentity.generate("a")
        >>> identity.site, len(identity.public_key)
        ('a', 64)
        """
        if not str(site).strip():
            raise ValueError("A site identity needs the site's name (non-empty).")
        private = Ed25519PrivateKey.generate()
        raw = private.private_bytes(
            format=serialization.PrivateFormat.Raw,
            encryption_algorithm=serialization.NoEncryption(),
            **_RAW,
        )
        return cls(site, raw.hex())

    def _private(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(self.private_key))

    @property
    def public_key(self) -> str:
        """The public key (hex): what goes into the :class:`Roster`."""
        return _public_hex(self._private())

    def sign(self, message: bytes) -> str:
        """The Ed25519 signature of ``message`` (hex).

        Parameters
        ----------
        message
            The bytes to sign.

        Returns
        -------
        The 64-byte signature as 128 hex characters (Ed25519 signatures are deterministic).

        Examples
        --------
        >>> identity = SiteIdentity.generate("a")
        >>> signature = identity.sign(b"hello")
        >>> len(signature), signature == identity.sign(b"hello")
        (128, True)
        """
        return self._private().sign(message).hex()

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the identity (private: owner-only permissions); returns the path.

        Parameters
        ----------
        path
            The file to write (a JSON file readable by :meth:`load`).
        overwrite
            Replace an existing file; otherwise an existing file is an error.

        Returns
        -------
        ``path``, as a :class:`~pathlib.Path`.

        Raises
        ------
        FileExistsError
            When ``path`` exists and ``overwrite`` is false.

        Examples
        --------
        >>> import tempfile
        >>> path = SiteIdentity.generate("a").save(tempfile.mkdtemp() + "/a.identity")
        >>> SiteIdentity.load(path).site
        'a'
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        payload = {"format": _IDENTITY_FORMAT, "site": self.site, "private_key": self.private_key}
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(payload, handle)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SiteIdentity:
        """Read an identity written by :meth:`save`.

        Parameters
        ----------
        path
            The identity file.

        Returns
        -------
        The identity.

        Raises
        ------
        ValueError
            When the file is not a readable scinfl identity file.

        Examples
        --------
        >>> import tempfile
        >>> identity = SiteIdentity.generate("a")
        >>> SiteIdentity.load(identity.save(tempfile.mkdtemp() + "/a.identity")) == identity
        True
        """
        payload = _read_json(Path(path), "site identity", _IDENTITY_FORMAT)
        return cls(str(payload["site"]), str(payload["private_key"]))


@dataclass(frozen=True)
class Roster:
    """The federation's sites and their identities' public keys, the same at every site.

    Parameters
    ----------
    public_keys
        Ed25519 public key (hex) of each site, by name.

    Examples
    --------
    >>> identities = [SiteIdentity.generate(s) for s in "ab"]
    >>> roster = Roster.from_identities(identities)
    >>> sorted(roster.public_keys)
    ['a', 'b']
    >>> roster.verify("b", b"m", identities[0].sign(b"m"))  # a's signature is not b's
    False
    """

    public_keys: Mapping[str, str]

    def __post_init__(self) -> None:
        owners: dict[str, list[str]] = {}
        for site, public_key in self.public_keys.items():
            owners.setdefault(str(public_key).lower(), []).append(site)
        shared = [sites for sites in owners.values() if len(sites) > 1]
        if shared:
            # one key for two sites lets either sign as the other: pinning pins nothing
            raise ValueError(
                f"Sites {shared[0]} have the same public key: each site draws its own identity "
                "(`scinfl identity SITE`); give each its own line."
            )
        for site, public_key in self.public_keys.items():
            if not str(site).strip():
                raise ValueError("A roster site name is empty: name every site.")
            try:
                valid = len(bytes.fromhex(public_key)) == 32
            except (TypeError, ValueError):
                valid = False
            if not valid:
                raise ValueError(
                    f"The roster's public key for site {site!r} is not 64 hex digits: give the "
                    "line that `scinfl identity` (SiteIdentity.public_key) printed at that site."
                )

    @classmethod
    def from_identities(cls, identities: list[SiteIdentity]) -> Roster:
        """The roster of these identities (the coordinator holds only their public keys).

        Parameters
        ----------
        identities
            One identity per site (only the public keys are kept).

        Returns
        -------
        The roster.

        Examples
        --------
        >>> identity = SiteIdentity.generate("a")
        >>> Roster.from_identities([identity]).public_keys == {"a": identity.public_key}
        True
        """
        return cls({identity.site: identity.public_key for identity in identities})

    def verify(self, site: str, message: bytes, signature: str) -> bool:
        """Whether ``signature`` is ``site``'s over ``message`` (``False`` for an unknown site).

        Parameters
        ----------
        site
            The site the message claims to come from.
        message
            The signed bytes.
        signature
            The signature (hex), as :meth:`SiteIdentity.sign` gives it.

        Returns
        -------
        ``True`` only for a valid signature by the key the roster pins for ``site``.

        Examples
        --------
        >>> identity = SiteIdentity.generate("a")
        >>> roster = Roster.from_identities([identity])
        >>> roster.verify("a", b"m", identity.sign(b"m")), roster.verify("a", b"other", identity.sign(b"m"))
        (True, False)
        >>> roster.verify("c", b"m", identity.sign(b"m"))  # not in the roster
        False
        """
        public = self.public_keys.get(site)
        if public is None or not signature:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(
                bytes.fromhex(signature), message
            )
        except (InvalidSignature, ValueError):
            return False
        return True

    def save(self, path: str | Path) -> Path:
        """Write the roster (public: it holds no secret); returns the path.

        Parameters
        ----------
        path
            The file to write (JSON; replaced if it exists).

        Returns
        -------
        ``path``, as a :class:`~pathlib.Path`.

        Examples
        --------
        >>> import tempfile
        >>> roster = Roster.from_identities([SiteIdentity.generate("a")])
        >>> Roster.load(roster.save(tempfile.mkdtemp() + "/roster.json")) == roster
        True
        """
        path = Path(path)
        payload = {"format": _ROSTER_FORMAT, "public_keys": dict(sorted(self.public_keys.items()))}
        path.write_text(json.dumps(payload, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Roster:
        """Read a roster written by :meth:`save`.

        Parameters
        ----------
        path
            The roster file.

        Returns
        -------
        The roster (its keys checked).

        Raises
        ------
        ValueError
            When the file is not a readable roster, or a key is invalid or shared by two sites.

        Examples
        --------
        >>> import tempfile
        >>> path = Roster.from_identities([SiteIdentity.generate(s) for s in "ab"]).save(tempfile.mkdtemp() + "/roster.json")
        >>> sorted(Roster.load(path).public_keys)
        ['a', 'b']
        """
        payload = _read_json(Path(path), "site roster", _ROSTER_FORMAT)
        return cls({str(site): str(key) for site, key in payload["public_keys"].items()})
