"""Key modes: how a key is turned into secret material and where it acts in the model.

A key mode owns two decisions, so that a new keyed design drops in without touching the VAE:
which secret material it derives from a :class:`~scinfl.Key` (``key_material``) and how it
rewires a module to depend on that material (``build_key_encoder`` and ``install``). Its
interface is the protocol :class:`KeyMode`; a mode that also keys parts of the model that
``install`` does not reach follows :class:`ModelKeyMode`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from scinfl.key import Key

from ._key_encoder import CoordinateKeyEncoder
from ._keyed_linear import PooledKeyedLinear
from ._keyify import keyify


@runtime_checkable
class KeyMode(Protocol):
    """What :class:`~scinfl.module.KeyedVAE` asks of a key mode (``key_mode=`` of the model).

    A key mode is built as ``mode_cls(key_strength=...)`` and registered in :data:`KEY_MODES`
    under its ``name``.

    Examples
    --------
    >>> isinstance(PooledKeyMode(), KeyMode)
    True
    """

    #: the name ``key_mode=`` selects it by
    name: ClassVar[str]

    def build_key_encoder(self, n_input: int) -> nn.Module:
        """The module that holds the key material (``set_coordinates``, ``has_key``).

        Parameters
        ----------
        n_input
            Number of features of the model.

        Returns
        -------
        The key encoder; the keyed layers call it (or read it) for the key.
        """
        ...

    def key_material(self, key: Key, n_input: int) -> torch.Tensor:
        """The secret material derived from ``key``, for the key encoder.

        Parameters
        ----------
        key
            The federation's key.
        n_input
            Number of features of the model.

        Returns
        -------
        The tensor the key encoder's ``set_coordinates`` takes.
        """
        ...

    def install(self, module: nn.Module, key_encoder: nn.Module) -> None:
        """Make ``module`` (the encoder, the classifier) depend on the key encoder.

        Parameters
        ----------
        module
            The module to key, modified in place.
        key_encoder
            The module :meth:`build_key_encoder` built.
        """
        ...


@runtime_checkable
class ModelKeyMode(KeyMode, Protocol):
    """A key mode that also keys the model outside the modules :meth:`~KeyMode.install` gets.

    :class:`~scinfl.module.KeyedVAE` calls ``install_model(vae, key_encoder)`` after
    ``install``, in its ``__init__`` (so that save and load see the keyed architecture).

    Examples
    --------
    >>> isinstance(PooledKeyMode(), ModelKeyMode)
    False
    """

    def install_model(self, vae: nn.Module, key_encoder: nn.Module | None = None) -> nn.Module:
        """Key the rest of ``vae`` (idempotent).

        Parameters
        ----------
        vae
            The whole VAE (e.g. its decoder's per-feature heads and dispersions).
        key_encoder
            The module :meth:`~KeyMode.build_key_encoder` built (``None``: ``vae.key_encoder``).

        Returns
        -------
        ``vae``, modified in place.
        """
        ...


class PooledKeyMode:
    """The paper's design: secret coordinates pooled by an INR into one key vector.

    128 secret 2-D coordinates are mean-pooled into a key vector that modulates every keyed
    linear layer (row scale, bias shift, FiLM).

    Parameters
    ----------
    key_strength
        ``lambda`` of the keyed layers.
    n_points
        Number of secret coordinates.
    key_dim
        Dimension of the pooled key vector.

    Examples
    --------
    >>> mode = PooledKeyMode(key_strength=2.0)
    >>> encoder = mode.build_key_encoder(n_input=100)
    >>> material = mode.key_material(Key.generate(), n_input=100)
    >>> tuple(material.shape)
    (128, 2)
    """

    name: ClassVar[str] = "pooled"

    def __init__(self, key_strength: float = 1.0, n_points: int = 128, key_dim: int = 16) -> None:
        self.key_strength = key_strength
        self.n_points = n_points
        self.key_dim = key_dim

    def build_key_encoder(self, n_input: int) -> CoordinateKeyEncoder:
        """The module that turns key material into what keyed layers consume.

        Parameters
        ----------
        n_input
            Number of features (unused: the pooled key does not depend on it).

        Returns
        -------
        A :class:`~scinfl.module.CoordinateKeyEncoder` of 2-D points and ``key_dim`` outputs.

        Examples
        --------
        >>> PooledKeyMode(key_dim=8).build_key_encoder(n_input=100).key_dim
        8
        """
        return CoordinateKeyEncoder(coord_dim=2, key_dim=self.key_dim)

    def key_material(self, key: Key, n_input: int) -> torch.Tensor:
        """Secret coordinates derived from ``key``.

        Parameters
        ----------
        key
            The federation's key.
        n_input
            Number of features (unused).

        Returns
        -------
        ``n_points`` coordinates in ``[-1, 1]^2``, shape ``(n_points, 2)``.

        Examples
        --------
        >>> PooledKeyMode(n_points=16).key_material(Key.generate(), n_input=100).shape
        torch.Size([16, 2])
        """
        return torch.from_numpy(key.coordinates(self.n_points, dim=2, purpose=self.name))

    def install(self, module: nn.Module, key_encoder: nn.Module) -> None:
        """Key every linear layer inside ``module``.

        Each :class:`torch.nn.Linear` becomes a :class:`~scinfl.module.PooledKeyedLinear`
        reading ``key_encoder`` (:func:`~scinfl.module.keyify`); it computes the same function
        until trained.

        Parameters
        ----------
        module
            The module to key, modified in place.
        key_encoder
            The key encoder :meth:`build_key_encoder` built.

        Examples
        --------
        >>> mode = PooledKeyMode()
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> mode.install(net, mode.build_key_encoder(n_input=4))
        >>> type(net[0]).__name__
        'PooledKeyedLinear'
        """
        keyify(
            module,
            key_encoder,
            layer_cls=PooledKeyedLinear,
            key_dim=self.key_dim,
            key_strength=self.key_strength,
        )


#: Registered key modes by name; ``key_mode=`` of the model picks one. The superseded
#: per-feature modes (``"feature"``, ``"feature-inr"``) are registered by
#: :mod:`scinfl.module.experimental`.
KEY_MODES: dict[str, type[KeyMode]] = {PooledKeyMode.name: PooledKeyMode}


def get_key_mode(name: str, **kwargs: Any) -> KeyMode:
    """Instantiate the key mode registered under ``name``.

    Parameters
    ----------
    name
        A name in :data:`KEY_MODES`: ``"pooled"``, or the superseded ``"feature"`` and
        ``"feature-inr"`` (:mod:`scinfl.module.experimental`).
    **kwargs
        Passed to the mode's constructor (``key_strength``, and the mode's own settings).

    Returns
    -------
    The key mode.

    Raises
    ------
    ValueError
        If no key mode is registered under ``name``.

    Examples
    --------
    >>> get_key_mode("pooled").name
    'pooled'
    """
    if name not in KEY_MODES:
        raise ValueError(
            f"Unknown key_mode {name!r}; choose one of {sorted(KEY_MODES)} or None (no key)."
        )
    return KEY_MODES[name](**kwargs)
