"""Coordinate key encoder: turns the secret coordinates into a key vector (the paper's design)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from scinfl.key import MISSING_KEY_MESSAGE, MissingKeyError


class CoordinateKeyEncoder(nn.Module):
    """Encode a set of secret coordinates into one key vector by an INR and mean pooling.

    ``phi(c) = LayerNorm(SiLU(W2 SiLU(W1 c + b1) + b2))`` for every point ``c``, mean-pooled
    over the points. The coordinates are a non-persistent buffer: they are in no
    ``state_dict``, saved model or upload; the encoder's weights are shared like any others.

    Parameters
    ----------
    coord_dim
        Dimension of each coordinate.
    key_dim
        Dimension of the key vector.
    n_hidden
        Hidden width of the INR.

    Examples
    --------
    >>> import torch
    >>> enc = CoordinateKeyEncoder()
    >>> enc.set_coordinates(torch.rand(128, 2) * 2 - 1)
    >>> enc().shape
    torch.Size([16])
    """

    #: the key material is continuous: an adaptive attacker can optimise it by gradient
    differentiable = True

    def __init__(self, coord_dim: int = 2, key_dim: int = 16, n_hidden: int = 32) -> None:
        super().__init__()
        self.coord_dim = coord_dim
        self.key_dim = key_dim
        self.fc1 = nn.Linear(coord_dim, n_hidden)
        self.fc2 = nn.Linear(n_hidden, key_dim)
        self.norm = nn.LayerNorm(key_dim)
        self.register_buffer("coordinates", None, persistent=False)
        self._cached: torch.Tensor | None = None
        self._caching = False

    @property
    def has_key(self) -> bool:
        """Whether coordinates are set."""
        return self.coordinates is not None

    def set_coordinates(self, coordinates: torch.Tensor | None) -> None:
        """Set (or clear, with ``None``) the secret coordinates.

        Stored detached, on the encoder's device and dtype, as a non-persistent buffer.

        Parameters
        ----------
        coordinates
            Shape ``(n_points, coord_dim)`` (e.g. :meth:`scinfl.Key.coordinates`), or ``None``
            to remove the key (:meth:`forward` then raises
            :class:`~scinfl.key.MissingKeyError`).

        Examples
        --------
        >>> enc = CoordinateKeyEncoder()
        >>> enc.set_coordinates(torch.zeros(8, 2))
        >>> enc.has_key, "coordinates" in enc.state_dict()
        (True, False)
        >>> enc.set_coordinates(None)
        >>> enc.has_key
        False
        """
        if coordinates is not None:
            if coordinates.ndim != 2 or coordinates.shape[1] != self.coord_dim:
                raise ValueError(
                    f"Expected coordinates of shape (n, {self.coord_dim}), got {tuple(coordinates.shape)}."
                )
            coordinates = coordinates.detach().to(self.fc1.weight.device, self.fc1.weight.dtype)
        self.coordinates = coordinates

    def encode_points(self, coordinates: torch.Tensor) -> torch.Tensor:
        """Per-point embeddings ``phi(c)``, before pooling.

        Parameters
        ----------
        coordinates
            Any points, shape ``(n, coord_dim)`` (not necessarily the secret ones).

        Returns
        -------
        Embeddings, shape ``(n, key_dim)``.

        Examples
        --------
        >>> CoordinateKeyEncoder(key_dim=4).encode_points(torch.zeros(3, 2)).shape
        torch.Size([3, 4])
        """
        return self.norm(F.silu(self.fc2(F.silu(self.fc1(coordinates)))))

    @contextmanager
    def reuse(self) -> Iterator[None]:
        """Compute the key vector once for every keyed layer of one forward pass.

        Returns
        -------
        A context manager: inside it, :meth:`forward` computes the key vector on its first
        call and returns that tensor on the later ones.

        Examples
        --------
        >>> enc = CoordinateKeyEncoder()
        >>> enc.set_coordinates(torch.zeros(4, 2))
        >>> with enc.reuse():
        ...     assert enc() is enc()
        """
        self._caching, self._cached = True, None
        try:
            yield
        finally:
            self._caching, self._cached = False, None

    def forward(self) -> torch.Tensor:
        """Pooled key vector: the mean of :meth:`encode_points` over the secret coordinates.

        Returns
        -------
        The key vector, shape ``(key_dim,)``.

        Raises
        ------
        MissingKeyError
            If no coordinates are set.

        Examples
        --------
        >>> enc = CoordinateKeyEncoder(key_dim=4)
        >>> enc.set_coordinates(torch.zeros(8, 2))
        >>> enc().shape
        torch.Size([4])
        """
        if self._cached is not None:
            return self._cached
        k = self._compute()
        if self._caching:
            self._cached = k
        return k

    def _compute(self) -> torch.Tensor:
        if self.coordinates is None:
            raise MissingKeyError(MISSING_KEY_MESSAGE)
        return self.encode_points(self.coordinates).mean(dim=0)
