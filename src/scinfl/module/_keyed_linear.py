"""The paper's keyed linear layer: key-conditioned row scale, bias shift and FiLM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class PooledKeyedLinear(nn.Linear):
    """A linear layer modulated by a pooled key vector (INFL, ``key_mode="pooled"``).

    With ``k`` the key vector and ``lambda`` the key strength:

    - ``[a_s; a_b] = U2 LN(SiLU(U1 k))``; ``W_eff = diag(1 + lambda tanh a_s) W``,
      ``b_eff = b + lambda tanh a_b``;
    - ``e = LN(SiLU(A h))``, ``[gamma; beta] = V2 SiLU(V1 [e; k; e * k])``,
      ``h' = h (1 + lambda tanh gamma) + lambda tanh beta``.

    ``U2`` and ``V2`` start at zero, so a freshly keyed layer computes exactly the linear layer
    it replaces. It subclasses :class:`torch.nn.Linear`, so code that looks for linear layers
    (e.g. scvi-tools' covariate injection) keeps working.

    Parameters
    ----------
    in_features, out_features, bias
        As for :class:`torch.nn.Linear`.
    key_source
        Callable returning the key vector (shape ``(key_dim,)``); typically the model's
        :class:`~scinfl.module.CoordinateKeyEncoder`. It is referenced, not registered, so its
        parameters appear once in the parent model.
    key_dim
        Dimension of the key vector.
    key_strength
        ``lambda``.
    n_hidden_scale
        Hidden width of the row-scale / bias-shift generator.
    n_hidden_film
        Width of the activation embedding ``e`` and of the FiLM generator.

    Examples
    --------
    >>> import torch
    >>> from scinfl.module import CoordinateKeyEncoder
    >>> enc = CoordinateKeyEncoder()
    >>> enc.set_coordinates(torch.rand(128, 2) * 2 - 1)
    >>> layer = PooledKeyedLinear.from_linear(torch.nn.Linear(5, 3), key_source=enc)
    >>> layer(torch.randn(4, 5)).shape
    torch.Size([4, 3])
    """

    is_keyed_layer = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        key_source: Callable[[], torch.Tensor],
        key_dim: int = 16,
        key_strength: float = 1.0,
        n_hidden_scale: int = 8,
        n_hidden_film: int = 16,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        # plain attribute, not a submodule: the key source belongs to the parent model
        object.__setattr__(self, "_key_source", key_source)
        self.key_strength = float(key_strength)
        self.scale_in = nn.Linear(key_dim, n_hidden_scale)
        self.scale_norm = nn.LayerNorm(n_hidden_scale)
        self.scale_out = nn.Linear(n_hidden_scale, 2 * out_features)
        self.film_embed = nn.Linear(out_features, key_dim)
        self.film_norm = nn.LayerNorm(key_dim)
        self.film_in = nn.Linear(3 * key_dim, n_hidden_film)
        self.film_out = nn.Linear(n_hidden_film, 2 * out_features)
        for zero_init in (self.scale_out, self.film_out):
            nn.init.zeros_(zero_init.weight)
            nn.init.zeros_(zero_init.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> PooledKeyedLinear:
        """Keyed copy of ``linear`` (weights and bias copied).

        The copy computes what ``linear`` computes until it is trained (the modulation starts
        at the identity), on ``linear``'s device and dtype.

        Parameters
        ----------
        linear
            The layer to copy.
        **kwargs
            Keyword arguments of the constructor: ``key_source`` (required), ``key_dim``,
            ``key_strength``, ``n_hidden_scale``, ``n_hidden_film``.

        Returns
        -------
        The keyed layer.

        Examples
        --------
        >>> from scinfl.module import CoordinateKeyEncoder
        >>> enc = CoordinateKeyEncoder()
        >>> enc.set_coordinates(torch.zeros(8, 2))
        >>> linear = nn.Linear(5, 3)
        >>> layer = PooledKeyedLinear.from_linear(linear, key_source=enc, key_strength=2.0)
        >>> x = torch.randn(4, 5)
        >>> torch.allclose(layer(x), linear(x))
        True
        """
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kwargs)
        layer.to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Keyed affine map followed by the activation-dependent FiLM.

        The arithmetic of the class docstring, with fewer (fused) operations: the row scale and
        shift in one ``addcmul``; ``V1 [e; k; e * k]`` as ``e (V1_e + V1_ek diag k)^T + V1_k k``
        (no per-row copy of the key); both FiLM outputs through one ``tanh``. These layers act
        on narrow hidden activations, where each operation costs its dispatch more than its
        arithmetic.

        Parameters
        ----------
        x
            Input, shape ``(..., in_features)``.

        Returns
        -------
        Output, shape ``(..., out_features)``.

        Raises
        ------
        MissingKeyError
            If the key source has no key.

        Examples
        --------
        >>> from scinfl.module import CoordinateKeyEncoder
        >>> enc = CoordinateKeyEncoder()
        >>> enc.set_coordinates(torch.zeros(8, 2))
        >>> PooledKeyedLinear(5, 3, key_source=enc)(torch.randn(4, 5)).shape
        torch.Size([4, 3])
        """
        k = self._key_source()
        lam = self.key_strength
        a = torch.tanh(self.scale_out(self.scale_norm(F.silu(self.scale_in(k)))))
        a_s, a_b = a.chunk(2, dim=-1)
        shift = lam * a_b if self.bias is None else torch.add(self.bias, a_b, alpha=lam)
        # diag(s) W x + b_eff, computed as (W x) * s to avoid materialising W_eff
        h = torch.addcmul(shift, F.linear(x, self.weight), 1 + lam * a_s)
        e = self.film_norm(F.silu(self.film_embed(h)))
        w_e, w_k, w_ek = self.film_in.weight.chunk(3, dim=-1)
        film = F.linear(e, w_e + w_ek * k, self.film_in.bias + w_k @ k)
        gamma, beta = torch.tanh(self.film_out(F.silu(film))).chunk(2, dim=-1)
        return torch.add(h, torch.addcmul(beta, h, gamma), alpha=lam)

    def extra_repr(self) -> str:
        """The linear layer's sizes and the key strength, for ``repr``."""
        return f"{super().extra_repr()}, key_strength={self.key_strength}"
