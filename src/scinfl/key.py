"""The secret key of a federation: generation, storage, fingerprint and rotation."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["MISSING_KEY_MESSAGE", "Key", "KeyFileError", "KeyMismatchError", "MissingKeyError"]

logger = logging.getLogger(__name__)

_FORMAT = "scinfl-key"
_FORMAT_VERSION = 1
_SEED_BYTES = 32  # 256 bits of entropy, drawn from the OS through `secrets`
_FINGERPRINT_LABEL = b"scinfl/key-fingerprint/v1"

#: What :class:`MissingKeyError` says wherever a keyed model is used without its key.
MISSING_KEY_MESSAGE = (
    "This model is keyed but has no key. Pass `key=` when creating or loading it, or call "
    "`model.set_key(scinfl.Key.load(path))`."
)


class KeyFileError(ValueError):
    """A key file is missing, corrupt or not a scinfl key."""


class KeyMismatchError(ValueError):
    """A key does not match the one a model or federation was built with."""


class MissingKeyError(RuntimeError):
    """A keyed model was used before a key was set."""


class Key:
    """Secret key of a federation: a seed from which every secret coordinate is derived.

    The key never leaves a site: it is kept out of every ``state_dict``, saved model, upload,
    log line and ``repr``. What may be shown (and what the server sees) is the
    :attr:`fingerprint`, an HMAC of a fixed label under the seed, and the :attr:`version`.

    Parameters
    ----------
    seed
        The secret, at least 16 bytes. Use :meth:`generate` rather than passing one.
    version
        Key version; bumped by :meth:`rotate`. Updates made under another version are rejected.

    Examples
    --------
    >>> import scinfl
    >>> key = scinfl.Key.generate()
    >>> key.version
    1
    >>> coords = key.coordinates(128, dim=2, purpose="pooled")
    >>> coords.shape
    (128, 2)
    """

    __slots__ = ("_seed", "_version")

    def __init__(self, seed: bytes, version: int = 1) -> None:
        if not isinstance(seed, bytes | bytearray):
            raise TypeError(
                f"A key seed is bytes, got {type(seed).__name__}; use `Key.generate()` (or "
                "`Key.load(path)` for a saved key)."
            )
        if len(seed) < 16:
            raise ValueError("A key seed must be at least 16 bytes; use `Key.generate()`.")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"Key version must be a positive integer, got {version!r}.")
        self._seed = bytes(seed)
        self._version = version

    @classmethod
    def generate(cls, version: int = 1) -> Key:
        """Draw a new key from the operating system's CSPRNG (256 bits).

        Parameters
        ----------
        version
            Version number to give the key.

        Returns
        -------
        A new :class:`Key`.

        Examples
        --------
        >>> key = Key.generate()
        >>> len(key.fingerprint)
        16
        """
        return cls(secrets.token_bytes(_SEED_BYTES), version=version)

    @property
    def version(self) -> int:
        """Key version (public)."""
        return self._version

    @property
    def fingerprint(self) -> str:
        """Public identifier of the key (64 bits of HMAC-SHA256 of a fixed label under the seed).

        It identifies the key without revealing anything about it.
        """
        digest = hmac.new(self._seed, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()
        return digest[:16]

    def coordinates(self, n: int, dim: int = 2, purpose: str = "pooled") -> np.ndarray:
        """Secret coordinates derived from the seed, uniform in ``[-1, 1]^dim``.

        Different ``purpose`` strings give independent coordinate sets from the same key.

        Parameters
        ----------
        n
            Number of points.
        dim
            Dimension of each point.
        purpose
            Domain-separation label (e.g. ``"pooled"`` or ``"features"``).

        Returns
        -------
        ``float32`` array of shape ``(n, dim)``.

        Examples
        --------
        >>> Key.generate().coordinates(4, dim=3, purpose="demo").shape
        (4, 3)
        """
        return (
            self._rng(b"scinfl/coords/" + purpose.encode())
            .uniform(-1.0, 1.0, size=(n, dim))
            .astype(np.float32)
        )

    def permutation(self, n: int, purpose: str = "classes") -> np.ndarray:
        """A secret permutation of ``range(n)`` derived from the seed.

        Independent of every coordinate set of the same key, and of permutations for other
        ``purpose`` strings.

        Parameters
        ----------
        n
            Length of the permutation.
        purpose
            Domain-separation label.

        Returns
        -------
        ``int64`` array holding each of ``0 .. n-1`` once.

        Examples
        --------
        >>> sorted(Key.generate().permutation(4).tolist())
        [0, 1, 2, 3]
        """
        return self._rng(b"scinfl/permutation/" + purpose.encode()).permutation(n).astype(np.int64)

    def secret_for(self, purpose: str) -> bytes:
        """32 secret bytes derived from the seed for ``purpose`` (e.g. masking seeds).

        Independent of the seed itself and of every other purpose: revealing one does not
        reveal the key.

        Parameters
        ----------
        purpose
            Domain-separation label; the same label always gives the same bytes.

        Returns
        -------
        32 bytes (HMAC-SHA256 of the label under the seed).

        Examples
        --------
        >>> key = Key.generate()
        >>> key.secret_for("a") != key.secret_for("b")
        True
        """
        return hmac.new(self._seed, b"scinfl/secret/" + purpose.encode(), hashlib.sha256).digest()

    def _rng(self, label: bytes) -> np.random.Generator:
        """A generator seeded by HMAC-SHA256 of ``label`` under the seed (domain separation)."""
        entropy = int.from_bytes(hmac.new(self._seed, label, hashlib.sha256).digest(), "big")
        return np.random.default_rng(np.random.SeedSequence(entropy))

    def rotate(self) -> Key:
        """Return a fresh key with the next version number.

        After rotation, load the model with the new key and fine-tune it for a few rounds
        (``model.set_key(new_key, allow_mismatch=True)`` then ``train_federated``).

        Returns
        -------
        A new random key whose :attr:`version` is this key's plus one (nothing of this key's
        seed carries over).

        Examples
        --------
        >>> key = Key.generate()
        >>> key.rotate().version
        2
        """
        return type(self).generate(version=self._version + 1)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the key to ``path`` with permissions ``0600``, atomically.

        Parameters
        ----------
        path
            Destination file.
        overwrite
            Replace an existing file. By default an existing file is never touched.

        Returns
        -------
        The path written.

        Examples
        --------
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "site.key")
        >>> _ = Key.generate().save(path)
        >>> oct(os.stat(path).st_mode & 0o777)
        '0o600'
        """
        # "~/fed/site.key" is the user's home, as pandas and scanpy read it (not a folder "~"
        # made here, with the secret in it)
        path = Path(path).expanduser()
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder: give the key file's path in it.")
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"{path} already exists; refusing to overwrite a key. Pass `overwrite=True` "
                "if you really mean to replace it (models trained with the old key become unusable)."
            )
        payload = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "version": self._version,
            "seed": self._seed.hex(),
            "fingerprint": self.fingerprint,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        # write a private temporary file next to the target, then move it in place: the key
        # file is never readable by others, nor half-written
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".scinfl-key-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(payload, fh)
                fh.write("\n")
            if overwrite:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # fails if the path appeared meanwhile
                os.unlink(tmp)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        logger.info(
            "Saved key version %d (fingerprint %s) to %s", self._version, self.fingerprint, path
        )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Key:
        """Read a key written by :meth:`save`, checking that it is complete and unaltered.

        Parameters
        ----------
        path
            Key file.

        Returns
        -------
        The :class:`Key`.

        Examples
        --------
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "site.key")
        >>> key = Key.generate()
        >>> _ = key.save(path)
        >>> Key.load(path) == key
        True
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise KeyFileError(
                f"No key file at {path}. Generate one with `scinfl.Key.generate().save(path)` "
                "at one site and copy it to the others over a private channel."
            )
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            logger.warning(
                "Key file %s is readable by others (mode %o); run `chmod 600 %s`.", path, mode, path
            )
        try:
            payload = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise KeyFileError(f"{path} is not a scinfl key file (not JSON: {err}).") from None
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise KeyFileError(
                f"{path} is not a scinfl key file (missing format marker {_FORMAT!r})."
            )
        if payload.get("format_version") != _FORMAT_VERSION:
            raise KeyFileError(
                f"{path} uses key format {payload.get('format_version')!r}; this scinfl reads "
                f"format {_FORMAT_VERSION}. Upgrade scinfl."
            )
        try:
            seed = bytes.fromhex(payload["seed"])
            key = cls(seed, version=payload["version"])
        except (KeyError, TypeError, ValueError) as err:
            raise KeyFileError(f"{path} is corrupt: {err}. Restore it from a backup.") from None
        if not hmac.compare_digest(key.fingerprint, str(payload.get("fingerprint", ""))):
            raise KeyFileError(
                f"{path} is corrupt: its fingerprint does not match its content. Restore it from a backup."
            )
        return key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Key):
            return NotImplemented
        return self._version == other._version and hmac.compare_digest(self._seed, other._seed)

    def __hash__(self) -> int:
        return hash((self.fingerprint, self._version))

    def __repr__(self) -> str:
        return f"Key(version={self._version}, fingerprint={self.fingerprint!r})"

    def __reduce__(self):
        # keys may be pickled to reach a worker process on the same site, never to be logged
        return (type(self), (self._seed, self._version))
