"""Per-feature keys: every feature reaches the shared parameters only through a secret per-feature transform.

Why: in an ordinary (or the paper's pooled-keyed) first layer ``h = W x + b`` a one-sample
gradient is ``dL/dW = delta x^T``, so ``x = dL/dW_i / dL/db_i`` exactly; likewise the decoder's
per-feature output layer and dispersions carry the per-feature residual of the sample. In these
key modes no shared tensor has a row or column per feature: every per-feature tensor is
generated from shared parameters through a secret per-feature map, and the server sees only the
image of ``x`` (and of the residual) under that map.

Two maps are provided:

- ``key_mode="feature"`` (:class:`FeatureKeyMode`): a secret orthogonal basis ``T`` of the (zero-padded)
  feature space, ``T = prod_r (H / sqrt(n)) S_r P_r`` with secret permutations ``P_r`` and signs
  ``S_r`` derived from per-feature secret coordinates and the Walsh-Hadamard matrix ``H``
  (``O(n log n)``). Shared tensors are the per-feature ones expressed in that basis
  (``A = W T^T``), so the model is an exact reparametrisation of the unkeyed one: same function
  at initialisation, same capacity. The server sees ``T x`` and ``T delta``.
- ``key_mode="feature-inr"`` (:class:`InrFeatureKeyMode`): the lead of the design notes - a shared
  INR generates each feature's embedding ``E_g`` from its secret coordinate ``c_g``; inputs are read
  as ``E^T x`` and per-feature outputs are ``E (P h + a)``. Cheaper in parameters but of lower
  capacity (``E`` has rank ``<= embed_dim``), which costs utility.

The secret material is a non-persistent buffer (never in a ``state_dict``, save or upload).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from scinfl.key import MISSING_KEY_MESSAGE, Key, MissingKeyError

logger = logging.getLogger(__name__)


def _log_superseded(name: str) -> None:
    logger.warning(
        "key_mode=%r is superseded and kept for research (scinfl.module.experimental): secret "
        "frames with the default key_mode='pooled' protect uploads without its utility cost; "
        "see docs/privacy.md.",
        name,
    )


@functools.lru_cache(maxsize=16)
def _hadamard(n: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(dtype=dtype, device=device)


def fwht(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform along ``dim`` (``-1`` or ``0``; a power of two).

    ``H_n = H_a (x) H_b`` with ``a b = n``, applied as two small dense products on the
    ``(a, b)``-reshaped input (few, large kernels rather than ``log2 n`` small ones).

    Examples
    --------
    >>> fwht(torch.tensor([1.0, 0.0, 0.0, 0.0])).tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    n = x.shape[dim]
    if n & (n - 1):
        raise ValueError(f"The transformed dimension must be a power of two, got {n}.")
    k = n.bit_length() - 1
    a, b = 1 << (k // 2), 1 << (k - k // 2)
    ha = _hadamard(a, x.dtype, str(x.device))
    hb = _hadamard(b, x.dtype, str(x.device))
    if dim in (-1, x.ndim - 1):
        y = x.reshape(*x.shape[:-1], a, b)
        return torch.matmul(torch.matmul(ha, y), hb).reshape(x.shape)  # H_a Y H_b
    if dim != 0:
        raise ValueError("fwht transforms along the first or the last dimension.")
    y = x.reshape(a, b, -1)
    y = torch.einsum("ij,jkm->ikm", ha, y)
    y = torch.einsum("kl,ilm->ikm", hb, y)
    return y.reshape(x.shape)


class SecretBasis(nn.Module):
    """A secret orthogonal map ``T`` of the zero-padded feature space, derived from the key.

    ``T v = (H/sqrt(n)) S_R P_R ... (H/sqrt(n)) S_1 P_1 v`` where ``n`` is the next power of two
    above the number of features, ``P_r`` permutations and ``S_r`` sign flips. Each padded
    feature has a secret coordinate in ``[-1, 1]^(2 R)``; round ``r`` sorts the features by
    coordinate ``2r`` (the permutation) and flips the sign of those with a negative coordinate
    ``2r + 1``. With all coordinates at zero (no key) ``T`` is the public Hadamard transform.

    Parameters
    ----------
    n_features
        Number of features.
    n_rounds
        Number of permute-flip-Hadamard rounds.

    Examples
    --------
    >>> basis = SecretBasis(5)
    >>> basis.set_coordinates(torch.rand(8, 6) * 2 - 1)
    >>> v = torch.randn(2, 8)
    >>> torch.allclose(basis.inverse(basis(v)), v, atol=1e-6)
    True
    """

    def __init__(self, n_features: int, n_rounds: int = 3) -> None:
        super().__init__()
        self.n_features = n_features
        self.size = 1 << max(0, (n_features - 1).bit_length())
        self.n_rounds = n_rounds
        self.register_buffer("coordinates", None, persistent=False)
        self.register_buffer("perm", None, persistent=False)
        self.register_buffer("inverse_perm", None, persistent=False)
        self.register_buffer("signs", None, persistent=False)

    @property
    def coord_dim(self) -> int:
        """Dimension of each feature's secret coordinate."""
        return 2 * self.n_rounds

    @property
    def has_key(self) -> bool:
        """Whether the secret material is set."""
        return self.coordinates is not None

    def set_coordinates(self, coordinates: torch.Tensor | None) -> None:
        """Set (or clear, with ``None``) the secret coordinates; derive the permutations and signs.

        Parameters
        ----------
        coordinates
            Shape ``(size, 2 * n_rounds)`` (:meth:`FeatureKeyMode.key_material`), or ``None``
            to remove the key.

        Examples
        --------
        >>> basis = SecretBasis(5)
        >>> basis.set_coordinates(torch.rand(8, 6) * 2 - 1)
        >>> basis.has_key, basis.perm.shape
        (True, torch.Size([3, 8]))
        """
        if coordinates is None:
            self.coordinates = self.perm = self.inverse_perm = self.signs = None
            return
        expected = (self.size, self.coord_dim)
        if tuple(coordinates.shape) != expected:
            raise ValueError(
                f"Expected coordinates of shape {expected}, got {tuple(coordinates.shape)}."
            )
        coordinates = coordinates.detach().float().cpu()
        perm = torch.stack(
            [torch.argsort(coordinates[:, 2 * r], stable=True) for r in range(self.n_rounds)]
        )
        signs = torch.where(coordinates[:, 1::2] < 0, -1.0, 1.0).T.contiguous()
        device = self.perm.device if self.perm is not None else None
        self.coordinates = coordinates.to(device)
        self.perm = perm.to(device)
        self.inverse_perm = torch.argsort(perm, dim=1).to(device)
        self.signs = signs.to(device)

    def _check(self) -> None:
        if self.perm is None:
            raise MissingKeyError(MISSING_KEY_MESSAGE)

    def pad(self, v: torch.Tensor) -> torch.Tensor:
        """Zero-pad the last dimension from ``n_features`` to ``size``.

        Parameters
        ----------
        v
            Tensor whose last dimension has at most ``size`` entries.

        Returns
        -------
        ``v`` with zeros appended to its last dimension, up to ``size``.

        Examples
        --------
        >>> SecretBasis(5).pad(torch.ones(2, 5)).shape
        torch.Size([2, 8])
        """
        return F.pad(v, (0, self.size - v.shape[-1]))

    def forward(self, v: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """``T v`` along ``dim`` (``-1`` or ``0``, of length ``size``).

        Parameters
        ----------
        v
            Tensor whose dimension ``dim`` has length ``size`` (:meth:`pad` the features
            first).
        dim
            ``-1`` (rows of vectors) or ``0`` (columns).

        Returns
        -------
        ``T v``, shape of ``v``.

        Raises
        ------
        MissingKeyError
            If no coordinates are set.
        """
        self._check()
        scale = 1 / math.sqrt(self.size)
        shape = (-1,) + (1,) * (v.ndim - 1) if dim == 0 else (-1,)
        perm, all_signs = self.perm.to(v.device), self.signs.to(v.device, v.dtype)
        for r in range(self.n_rounds):
            signs = all_signs[r].reshape(shape)
            v = fwht(torch.index_select(v, dim, perm[r]) * signs, dim) * scale
        return v

    def inverse(self, v: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """``T^-1 v = T^T v`` along ``dim`` (``-1`` or ``0``).

        Parameters
        ----------
        v
            Tensor whose dimension ``dim`` has length ``size`` (:meth:`pad` the features
            first).
        dim
            ``-1`` (rows of vectors) or ``0`` (columns).

        Returns
        -------
        ``T^T v``, shape of ``v``.

        Raises
        ------
        MissingKeyError
            If no coordinates are set.
        """
        self._check()
        scale = 1 / math.sqrt(self.size)
        shape = (-1,) + (1,) * (v.ndim - 1) if dim == 0 else (-1,)
        inverse_perm, all_signs = self.inverse_perm.to(v.device), self.signs.to(v.device, v.dtype)
        for r in reversed(range(self.n_rounds)):
            signs = all_signs[r].reshape(shape)
            v = torch.index_select(fwht(v, dim) * (signs * scale), dim, inverse_perm[r])
        return v


class BasisInputLinear(nn.Linear):
    """First encoder layer whose feature weights are shared in a secret basis.

    ``h = W x_f + W_c x_c + b`` with ``W = (A T)[:, :n_features]``: the shared ``A``
    (``feature_weight``, ``out x size``) is ``W`` in the basis ``T``, and its one-sample gradient
    is ``delta (T x)^T``. ``weight`` holds only the covariate columns that scvi-tools appends.

    Parameters
    ----------
    in_features, out_features, bias
        As for :class:`torch.nn.Linear` (``in_features`` includes covariates).
    key_source
        The :class:`SecretBasis` (referenced, not registered).
    n_features
        Number of feature columns at the start of the input.

    Examples
    --------
    >>> basis = SecretBasis(6)
    >>> basis.set_coordinates(torch.rand(8, 6) * 2 - 1)
    >>> linear = torch.nn.Linear(6, 4)
    >>> layer = BasisInputLinear.from_linear(linear, key_source=basis, n_features=6)
    >>> x = torch.randn(3, 6)
    >>> torch.allclose(layer(x), linear(x), atol=1e-5)
    True
    """

    is_keyed_layer = True
    projected_weight_name = "feature_weight"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        key_source: SecretBasis,
        n_features: int,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if n_features > in_features:
            raise ValueError(f"n_features={n_features} exceeds in_features={in_features}.")
        object.__setattr__(self, "_key_source", key_source)
        self.n_features = n_features
        self.feature_weight = nn.Parameter(torch.zeros(out_features, key_source.size))
        self.weight = nn.Parameter(self.weight.detach()[:, n_features:].clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> BasisInputLinear:
        """Keyed copy of ``linear``: the same function under the key it is built with.

        Without a key set, the feature weights are drawn with ``linear``'s spread instead.

        Parameters
        ----------
        linear
            The layer to copy.
        **kwargs
            ``key_source`` and ``n_features`` (keyword arguments of the constructor).

        Returns
        -------
        The keyed layer.
        """
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kwargs)
        layer.to(linear.weight.device, linear.weight.dtype)
        basis = layer._key_source
        with torch.no_grad():
            w = linear.weight[:, : layer.n_features]
            if basis.has_key:
                layer.feature_weight.copy_(basis(basis.pad(w)))
            else:  # no key yet: the same distribution, expressed in an unknown basis
                layer.feature_weight.normal_(0, float(w.std()))
            layer.weight.copy_(linear.weight[:, layer.n_features :])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def effective_weight(self) -> torch.Tensor:
        """The per-feature weight ``W``, computed with the key.

        Returns
        -------
        ``W``, shape ``(out_features, n_features)``.
        """
        return self._key_source.inverse(self.feature_weight)[:, : self.n_features]

    def lift(self, projection: torch.Tensor) -> torch.Tensor:
        """Features ``x`` with ``T x = projection`` under the current key.

        Parameters
        ----------
        projection
            Vectors in the secret basis, shape ``(..., size)``.

        Returns
        -------
        Features, shape ``(..., n_features)``.
        """
        return self._key_source.inverse(projection.to(self.feature_weight.dtype))[
            ..., : self.n_features
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Keyed affine map.

        Parameters
        ----------
        x
            Input, shape ``(..., in_features)``: the features, then any covariates.

        Returns
        -------
        Output, shape ``(..., out_features)``.
        """
        h = F.linear(x[..., : self.n_features], self.effective_weight(), self.bias)
        if self.weight.shape[1]:
            h = h + F.linear(x[..., self.n_features :], self.weight)
        return h

    def extra_repr(self) -> str:
        """The layer's sizes (features and covariates), for ``repr``."""
        return f"in_features={self.in_features}, n_features={self.n_features}, out_features={self.out_features}"


class BasisOutputLinear(nn.Module):
    """Per-feature output head whose weights and biases are shared in a secret basis.

    ``y = W h + b`` with ``W = T^T P`` and ``b = T^T a`` restricted to the features; the shared
    ``P`` and ``a`` receive ``T delta`` instead of the per-feature residual ``delta``.

    Parameters
    ----------
    in_features, out_features
        Input width and number of features.
    key_source
        The :class:`SecretBasis`.

    Examples
    --------
    >>> basis = SecretBasis(6)
    >>> basis.set_coordinates(torch.rand(8, 6) * 2 - 1)
    >>> linear = torch.nn.Linear(4, 6)
    >>> head = BasisOutputLinear.from_linear(linear, key_source=basis)
    >>> h = torch.randn(3, 4)
    >>> torch.allclose(head(h), linear(h), atol=1e-5)
    True
    """

    is_keyed_layer = True

    def __init__(self, in_features: int, out_features: int, *, key_source: SecretBasis) -> None:
        super().__init__()
        object.__setattr__(self, "_key_source", key_source)
        self.in_features = in_features
        self.out_features = out_features
        self.feature_weight = nn.Parameter(torch.zeros(key_source.size, in_features))
        self.feature_bias = nn.Parameter(torch.zeros(key_source.size))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, key_source: SecretBasis) -> BasisOutputLinear:
        """Keyed copy of ``linear`` (``out_features`` = number of features).

        The same function under the key it is built with; without a key set, the weights
        and biases are drawn with ``linear``'s spread instead.

        Parameters
        ----------
        linear
            The per-feature output layer to copy.
        key_source
            The :class:`SecretBasis`.

        Returns
        -------
        The keyed head.
        """
        head = cls(linear.in_features, linear.out_features, key_source=key_source)
        head.to(linear.weight.device, linear.weight.dtype)
        b = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
        with torch.no_grad():
            if key_source.has_key:
                padded = F.pad(linear.weight, (0, 0, 0, key_source.size - linear.out_features))
                head.feature_weight.copy_(key_source(padded, dim=0))
                head.feature_bias.copy_(key_source(key_source.pad(b)))
            else:
                head.feature_weight.normal_(0, float(linear.weight.std()))
                head.feature_bias.normal_(0, float(b.std()) if b.numel() > 1 else 0.0)
        return head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Per-feature outputs.

        Parameters
        ----------
        h
            Hidden activations, shape ``(..., in_features)``.

        Returns
        -------
        Outputs, shape ``(..., out_features)``.
        """
        basis = self._key_source
        weight = basis.inverse(self.feature_weight, dim=0)[: self.out_features]
        bias = basis.inverse(self.feature_bias)[: self.out_features]
        return F.linear(h, weight, bias)

    def extra_repr(self) -> str:
        """The head's sizes, for ``repr``."""
        return f"in_features={self.in_features}, out_features={self.out_features} (secret basis)"


class BasisVector(nn.Module):
    """Parametrization of a per-feature tensor (e.g. ``px_r``) shared in a secret basis.

    Registered with :func:`torch.nn.utils.parametrize.register_parametrization` (``unsafe``):
    the original tensor is replaced by an empty one; ``weight`` (``size`` or ``size x k``) is the
    tensor in the basis.

    Parameters
    ----------
    key_source
        The :class:`SecretBasis` (referenced, not registered).
    value
        The per-feature tensor, shape ``(n_features,)`` or ``(n_features, k)``: expressed in
        the basis when a key is set, else only its shape is used (random weights).

    Examples
    --------
    >>> basis = SecretBasis(6)
    >>> basis.set_coordinates(torch.rand(8, 6) * 2 - 1)
    >>> value = torch.randn(6)
    >>> vec = BasisVector(basis, value)
    >>> torch.allclose(vec(torch.empty(0)), value, atol=1e-6)
    True
    """

    def __init__(self, key_source: SecretBasis, value: torch.Tensor) -> None:
        super().__init__()
        object.__setattr__(self, "_key_source", key_source)
        self.n_features = value.shape[0]
        v = value.detach().reshape(value.shape[0], -1).T  # (k, n_features)
        with torch.no_grad():
            w = (
                key_source(key_source.pad(v))
                if key_source.has_key
                else torch.randn(v.shape[0], key_source.size)
            )
        self.squeeze = value.ndim == 1
        self.weight = nn.Parameter(w.reshape(-1) if self.squeeze else w.T.contiguous())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        """The per-feature tensor (``original`` is ignored).

        Parameters
        ----------
        original
            The stored (empty) tensor, passed by the parametrization.

        Returns
        -------
        The per-feature tensor, shape ``(n_features,)`` or ``(n_features, k)``.
        """
        w = self.weight if self.squeeze else self.weight.T
        v = self._key_source.inverse(w)[..., : self.n_features]
        return v if self.squeeze else v.T

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        """Nothing per feature is stored.

        Parameters
        ----------
        value
            The value assigned to the parametrized tensor (ignored).

        Returns
        -------
        An empty tensor, stored in place of the per-feature one.
        """
        return value.new_empty(0)


class _PerFeatureKeyMode:
    """Shared installation logic of the per-feature key modes."""

    name: ClassVar[str]

    def _input_layer(self, linear: nn.Linear, key_encoder: nn.Module, n_features: int) -> nn.Module:
        raise NotImplementedError

    def _output_layer(self, linear: nn.Linear, key_encoder: nn.Module) -> nn.Module:
        raise NotImplementedError

    def _vector(self, value: torch.Tensor, key_encoder: nn.Module) -> nn.Module:
        raise NotImplementedError

    def install(self, module: nn.Module, key_encoder: nn.Module) -> None:
        """Replace the first linear layer of ``module`` if it reads the features.

        Modules that do not read the features (e.g. a classifier on the latent space) are left
        as they are.

        Parameters
        ----------
        module
            The module to key (the encoder), modified in place.
        key_encoder
            The key encoder :meth:`build_key_encoder` built.
        """
        n_features = key_encoder.n_features
        first = next(((n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)), None)
        if first is None or type(first[1]) is not nn.Linear or first[1].in_features < n_features:
            return
        path, linear = first
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, name, self._input_layer(linear, key_encoder, n_features))

    def install_model(self, vae: nn.Module, key_encoder: nn.Module | None = None) -> nn.Module:
        """Key the per-feature parts of a VAE's decoder: output heads and dispersions.

        Replaces every linear layer of ``vae.decoder`` with one output per feature that the
        likelihood uses (the mean head always, the dropout head with ZINB, the dispersion head
        with ``dispersion="gene-cell"``; unused heads receive no gradient and keep their random
        initial values), and parametrizes ``vae.px_r``. Idempotent.

        Parameters
        ----------
        vae
            The whole VAE (``decoder`` and ``px_r`` as in scvi-tools' VAE).
        key_encoder
            The key encoder :meth:`build_key_encoder` built (``None``: ``vae.key_encoder``).

        Returns
        -------
        ``vae``, modified in place.

        Notes
        -----
        :class:`~scinfl.module.KeyedVAE` calls it from its ``__init__``; call it yourself only
        for another VAE.

        Examples
        --------
        >>> from scinfl.module import KeyedVAE
        >>> vae = KeyedVAE(n_input=20, key_mode="feature")  # logs that the mode is superseded
        >>> _ = vae._key_mode.install_model(vae)
        >>> [n for n in vae.state_dict() if n.endswith("px_r")]
        []
        """
        key_encoder = key_encoder if key_encoder is not None else vae.key_encoder
        n_features = key_encoder.n_features
        # heads the likelihood never uses get no gradient and carry nothing: leave them be
        unused = set()
        if getattr(vae, "gene_likelihood", None) != "zinb":
            unused.add("px_dropout_decoder")
        if getattr(vae, "dispersion", None) != "gene-cell":
            unused.add("px_r_decoder")
        for parent in list(vae.decoder.modules()):
            for name, child in list(parent.named_children()):
                if name in unused:
                    continue
                if type(child) is nn.Linear and child.out_features == n_features:
                    setattr(parent, name, self._output_layer(child, key_encoder))
        # (reading a parametrized px_r would need the key: test for the parametrization first)
        px_r = None if parametrize.is_parametrized(vae, "px_r") else getattr(vae, "px_r", None)
        if isinstance(px_r, nn.Parameter):
            if px_r.shape[0] == n_features:
                vector = self._vector(px_r, key_encoder).to(px_r.device, px_r.dtype)
                parametrize.register_parametrization(vae, "px_r", vector, unsafe=True)
        return vae


class FeatureKeyMode(_PerFeatureKeyMode):
    """Per-feature secret basis (``key_mode="feature"``).

    Every per-feature tensor is shared in a secret orthogonal basis of the feature space (see
    :class:`SecretBasis`).

    The keyed model is an exact reparametrisation of the unkeyed one (same function when built
    from the same weights, same capacity); what differs is what the server sees: ``T x`` for an
    input ``x`` and ``T delta`` for a per-feature residual, with ``T`` secret.

    :meth:`install` keys the encoder's first layer (what :class:`~scinfl.module.KeyedVAE` calls);
    :meth:`install_model` keys the decoder's per-feature heads and the dispersions.

    Parameters
    ----------
    key_strength
        Unused (accepted for a uniform key-mode interface).
    n_rounds
        Number of permute-flip-Hadamard rounds of the basis.

    Examples
    --------
    >>> mode = FeatureKeyMode()
    >>> basis = mode.build_key_encoder(n_input=50)
    >>> basis.set_coordinates(mode.key_material(Key.generate(), n_input=50))
    >>> basis.size
    64
    """

    name: ClassVar[str] = "feature"

    def __init__(self, key_strength: float = 1.0, n_rounds: int = 3) -> None:
        _log_superseded(self.name)
        self.key_strength = key_strength
        self.n_rounds = n_rounds

    def build_key_encoder(self, n_input: int) -> SecretBasis:
        """The secret basis of the feature space.

        Parameters
        ----------
        n_input
            Number of features.

        Returns
        -------
        A :class:`SecretBasis` of ``n_input`` features, without a key.
        """
        return SecretBasis(n_input, n_rounds=self.n_rounds)

    def key_material(self, key: Key, n_input: int) -> torch.Tensor:
        """One secret coordinate per (padded) feature, derived from ``key``.

        Parameters
        ----------
        key
            The federation's key.
        n_input
            Number of features.

        Returns
        -------
        Coordinates, shape ``(size, 2 * n_rounds)`` with ``size`` the next power of two from
        ``n_input``.
        """
        size = 1 << max(0, (n_input - 1).bit_length())
        return torch.from_numpy(key.coordinates(size, dim=2 * self.n_rounds, purpose=self.name))

    def _input_layer(self, linear, key_encoder, n_features):
        return BasisInputLinear.from_linear(linear, key_source=key_encoder, n_features=n_features)

    def _output_layer(self, linear, key_encoder):
        return BasisOutputLinear.from_linear(linear, key_source=key_encoder)

    def _vector(self, value, key_encoder):
        return BasisVector(key_encoder, value)


class FeatureKeyEncoder(nn.Module):
    """Shared INR from secret per-feature coordinates to per-feature embeddings ``E``.

    ``E_g = LayerNorm(W2 sin(omega (W1 c_g + b1)) + b2)``: sine features of the coordinate (so
    that nearby coordinates need not give nearby embeddings), then a linear map to ``embed_dim``.

    Parameters
    ----------
    n_features
        Number of input features.
    coord_dim
        Dimension of each feature's secret coordinate.
    n_hidden
        Width of the INR.
    embed_dim
        Dimension ``d`` of the embeddings.
    omega
        Frequency of the sine layer.

    Examples
    --------
    >>> import torch
    >>> enc = FeatureKeyEncoder(n_features=30)
    >>> enc.set_coordinates(torch.rand(30, 16) * 2 - 1)
    >>> enc().shape
    torch.Size([30, 128])
    """

    #: the key material is continuous: an adaptive attacker can optimise it by gradient
    differentiable = True

    def __init__(
        self,
        n_features: int,
        coord_dim: int = 16,
        n_hidden: int = 128,
        embed_dim: int = 128,
        omega: float = 3.0,
    ) -> None:
        super().__init__()
        self.n_features = n_features
        self.coord_dim = coord_dim
        self.embed_dim = embed_dim
        self.omega = omega
        self.fc1 = nn.Linear(coord_dim, n_hidden)
        self.fc2 = nn.Linear(n_hidden, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.register_buffer("coordinates", None, persistent=False)
        self._cached: torch.Tensor | None = None
        self._caching = False

    @property
    def has_key(self) -> bool:
        """Whether coordinates are set."""
        return self.coordinates is not None

    @contextmanager
    def reuse(self) -> Iterator[None]:
        """Compute the embeddings once for every keyed layer of one forward pass.

        Returns
        -------
        A context manager: inside it, :meth:`forward` computes ``E`` on its first call and
        returns that tensor on the later ones.

        Examples
        --------
        >>> enc = FeatureKeyEncoder(n_features=3)
        >>> enc.set_coordinates(torch.zeros(3, 16))
        >>> with enc.reuse():
        ...     assert enc() is enc()
        """
        self._caching, self._cached = True, None
        try:
            yield
        finally:
            self._caching, self._cached = False, None

    def set_coordinates(self, coordinates: torch.Tensor | None) -> None:
        """Set (or clear, with ``None``) the secret coordinates.

        Parameters
        ----------
        coordinates
            Shape ``(n_features, coord_dim)`` (:meth:`InrFeatureKeyMode.key_material`), or
            ``None`` to remove the key.

        Examples
        --------
        >>> enc = FeatureKeyEncoder(n_features=3, coord_dim=4)
        >>> enc.set_coordinates(torch.zeros(3, 4))
        >>> enc.has_key
        True
        """
        if coordinates is not None:
            expected = (self.n_features, self.coord_dim)
            if tuple(coordinates.shape) != expected:
                raise ValueError(
                    f"Expected coordinates of shape {expected}, got {tuple(coordinates.shape)}."
                )
            coordinates = coordinates.detach().to(self.fc1.weight.device, self.fc1.weight.dtype)
        self.coordinates = coordinates

    def embed(self, coordinates: torch.Tensor) -> torch.Tensor:
        """Embeddings of arbitrary coordinates.

        Parameters
        ----------
        coordinates
            Points, shape ``(n, coord_dim)`` (not necessarily the secret ones).

        Returns
        -------
        Embeddings, shape ``(n, embed_dim)``.
        """
        return self.norm(self.fc2(torch.sin(self.omega * self.fc1(coordinates))))

    def forward(self) -> torch.Tensor:
        """Embeddings ``E`` of the secret coordinates.

        Returns
        -------
        ``E``, shape ``(n_features, embed_dim)``.

        Raises
        ------
        MissingKeyError
            If no coordinates are set.
        """
        if self._cached is not None:
            return self._cached
        emb = self._compute()
        if self._caching:
            self._cached = emb
        return emb

    def _compute(self) -> torch.Tensor:
        if self.coordinates is None:
            raise MissingKeyError(MISSING_KEY_MESSAGE)
        return self.embed(self.coordinates)


class FeatureInputLinear(nn.Linear):
    """First encoder layer that reads the features through secret embeddings.

    ``h = A (E^T x_f) / sqrt(d) + W_c x_c + b`` where ``x_f`` are the first ``n_features`` inputs and
    ``x_c`` the remaining ones (covariates that scvi-tools appends); ``A`` is ``feature_weight``.
    Subclasses :class:`torch.nn.Linear` so covariate injection keeps working; ``weight`` holds
    only the covariate columns.

    Parameters
    ----------
    in_features, out_features, bias
        As for :class:`torch.nn.Linear` (``in_features`` includes covariates).
    key_source
        The :class:`FeatureKeyEncoder` (referenced, not registered).
    n_features
        Number of feature columns at the start of the input.

    Examples
    --------
    >>> import torch
    >>> enc = FeatureKeyEncoder(n_features=6)
    >>> enc.set_coordinates(torch.rand(6, 16))
    >>> layer = FeatureInputLinear(8, 4, key_source=enc, n_features=6)
    >>> layer(torch.randn(3, 8)).shape
    torch.Size([3, 4])
    """

    is_keyed_layer = True
    projected_weight_name = "feature_weight"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        key_source: FeatureKeyEncoder,
        n_features: int,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if n_features > in_features:
            raise ValueError(f"n_features={n_features} exceeds in_features={in_features}.")
        object.__setattr__(self, "_key_source", key_source)
        self.n_features = n_features
        d = key_source.embed_dim
        bound = 1 / math.sqrt(in_features)
        self.feature_weight = nn.Parameter(torch.empty(out_features, d).uniform_(-bound, bound))
        self.weight = nn.Parameter(self.weight.detach()[:, n_features:].clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> FeatureInputLinear:
        """Replacement for ``linear`` (its covariate columns and bias are copied).

        The feature weights are not copied (no per-feature weight exists): the layer starts
        from fresh ones.

        Parameters
        ----------
        linear
            The layer to replace.
        **kwargs
            ``key_source`` and ``n_features`` (keyword arguments of the constructor).

        Returns
        -------
        The keyed layer.
        """
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kwargs)
        layer.to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight[:, layer.n_features :])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def project(self, x_features: torch.Tensor) -> torch.Tensor:
        """``E^T x / sqrt(d)`` for rows ``x`` of features.

        Parameters
        ----------
        x_features
            Features, shape ``(..., n_features)``.

        Returns
        -------
        The projection, shape ``(..., embed_dim)``.
        """
        emb = self._key_source()
        return x_features @ emb / math.sqrt(emb.shape[1])

    def lift(self, projection: torch.Tensor) -> torch.Tensor:
        """Minimum-norm features ``x`` with ``E^T x / sqrt(d) = projection`` under the current key.

        Parameters
        ----------
        projection
            Projections, shape ``(n, embed_dim)``.

        Returns
        -------
        Features, shape ``(n, n_features)``, in float64.
        """
        emb = self._key_source().detach().double()
        proj = projection.double() * math.sqrt(emb.shape[1])
        return (torch.linalg.pinv(emb.T) @ proj.T).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Keyed affine map.

        Parameters
        ----------
        x
            Input, shape ``(..., in_features)``: the features, then any covariates.

        Returns
        -------
        Output, shape ``(..., out_features)``.
        """
        h = F.linear(self.project(x[..., : self.n_features]), self.feature_weight, self.bias)
        if self.weight.shape[1]:
            h = h + F.linear(x[..., self.n_features :], self.weight)
        return h

    def extra_repr(self) -> str:
        """The layer's sizes (features and covariates), for ``repr``."""
        return f"in_features={self.in_features}, n_features={self.n_features}, out_features={self.out_features}"


class FeatureOutputLinear(nn.Module):
    """Per-feature output head whose rows and biases are generated from the secret embeddings.

    ``y = E (P h + a) / sqrt(d) + c``: ``P`` (``d x in_features``), ``a`` (``d``) and the scalar ``c`` are
    shared; the per-feature weight matrix ``E P / sqrt(d)`` and bias ``E a / sqrt(d) + c`` exist only
    where the key is.

    Parameters
    ----------
    in_features
        Input width.
    key_source
        The :class:`FeatureKeyEncoder`.

    Examples
    --------
    >>> import torch
    >>> enc = FeatureKeyEncoder(n_features=6)
    >>> enc.set_coordinates(torch.rand(6, 16))
    >>> FeatureOutputLinear(4, key_source=enc)(torch.randn(3, 4)).shape
    torch.Size([3, 6])
    """

    is_keyed_layer = True

    def __init__(self, in_features: int, *, key_source: FeatureKeyEncoder) -> None:
        super().__init__()
        object.__setattr__(self, "_key_source", key_source)
        self.in_features = in_features
        self.out_features = key_source.n_features
        d = key_source.embed_dim
        bound = 1 / math.sqrt(in_features)
        self.feature_weight = nn.Parameter(torch.empty(d, in_features).uniform_(-bound, bound))
        self.feature_bias = nn.Parameter(torch.empty(d).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Per-feature outputs.

        Parameters
        ----------
        h
            Hidden activations, shape ``(..., in_features)``.

        Returns
        -------
        Outputs, shape ``(..., n_features)``.
        """
        emb = self._key_source()
        z = (F.linear(h, self.feature_weight) + self.feature_bias) / math.sqrt(emb.shape[1])
        return z @ emb.T + self.bias

    def extra_repr(self) -> str:
        """The head's sizes, for ``repr``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features} (keyed per feature)"
        )


class FeatureVector(nn.Module):
    """Parametrization of a per-feature vector (e.g. ``px_r``) as ``E r / sqrt(d) + r0``.

    Registered with :func:`torch.nn.utils.parametrize.register_parametrization` (``unsafe``):
    the original per-feature tensor is replaced by an empty one, so only ``r`` and ``r0`` are
    shared.

    Parameters
    ----------
    key_source
        The :class:`FeatureKeyEncoder` (referenced, not registered).
    n_columns
        ``0`` for a vector (``n_features``), else the columns of a ``n_features x n_columns``
        tensor.

    Examples
    --------
    >>> import torch
    >>> enc = FeatureKeyEncoder(n_features=6)
    >>> enc.set_coordinates(torch.rand(6, 16))
    >>> FeatureVector(enc)(torch.empty(0)).shape
    torch.Size([6])
    """

    def __init__(self, key_source: FeatureKeyEncoder, n_columns: int = 0) -> None:
        super().__init__()
        object.__setattr__(self, "_key_source", key_source)
        self.n_columns = n_columns
        d = key_source.embed_dim
        shape = (d,) if n_columns == 0 else (d, n_columns)
        self.weight = nn.Parameter(torch.randn(shape))
        self.offset = nn.Parameter(torch.zeros(() if n_columns == 0 else (n_columns,)))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        """The per-feature vector (``original`` is ignored).

        Parameters
        ----------
        original
            The stored (empty) tensor, passed by the parametrization.

        Returns
        -------
        The per-feature tensor, shape ``(n_features,)`` or ``(n_features, n_columns)``.
        """
        emb = self._key_source()
        return emb @ self.weight / math.sqrt(emb.shape[1]) + self.offset

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        """Nothing per feature is stored.

        Parameters
        ----------
        value
            The value assigned to the parametrized tensor (ignored).

        Returns
        -------
        An empty tensor, stored in place of the per-feature one.
        """
        return value.new_empty(0)


class InrFeatureKeyMode(_PerFeatureKeyMode):
    """Secret per-feature coordinates through an INR (``key_mode="feature-inr"``).

    Each feature ``g`` gets a secret coordinate ``c_g`` in ``[-1, 1]^coord_dim``; a shared INR
    turns it into an embedding ``E_g``. The encoder reads the features only as ``E^T x``
    (:class:`FeatureInputLinear`), and the decoder's per-feature head and the dispersions are
    generated from ``E`` (:class:`FeatureOutputLinear`, :class:`FeatureVector`), so no shared
    tensor has a row or column per feature.

    :meth:`install` keys the encoder's first layer (what :class:`~scinfl.module.KeyedVAE` calls);
    :meth:`install_model` keys the decoder's per-feature heads and dispersions, and must be
    called on the whole VAE (see its notes).

    Parameters
    ----------
    key_strength
        Unused (accepted for a uniform key-mode interface).
    coord_dim
        Dimension of the secret coordinates.
    embed_dim
        Dimension ``d`` of the feature embeddings (and of ``E^T x``).
    n_hidden
        Width of the INR.
    omega
        Frequency of the INR's sine layer.

    Examples
    --------
    >>> mode = InrFeatureKeyMode()
    >>> encoder = mode.build_key_encoder(n_input=50)
    >>> tuple(mode.key_material(Key.generate(), n_input=50).shape)
    (50, 16)
    """

    name: ClassVar[str] = "feature-inr"

    def __init__(
        self,
        key_strength: float = 1.0,
        coord_dim: int = 16,
        embed_dim: int = 128,
        n_hidden: int = 128,
        omega: float = 3.0,
    ) -> None:
        _log_superseded(self.name)
        self.key_strength = key_strength
        self.coord_dim = coord_dim
        self.embed_dim = embed_dim
        self.n_hidden = n_hidden
        self.omega = omega

    def build_key_encoder(self, n_input: int) -> FeatureKeyEncoder:
        """The INR from secret coordinates to feature embeddings.

        Parameters
        ----------
        n_input
            Number of features.

        Returns
        -------
        A :class:`FeatureKeyEncoder` of ``n_input`` features, without a key.
        """
        return FeatureKeyEncoder(
            n_input,
            coord_dim=self.coord_dim,
            n_hidden=self.n_hidden,
            embed_dim=self.embed_dim,
            omega=self.omega,
        )

    def key_material(self, key: Key, n_input: int) -> torch.Tensor:
        """One secret coordinate per feature, derived from ``key``.

        Parameters
        ----------
        key
            The federation's key.
        n_input
            Number of features.

        Returns
        -------
        Coordinates, shape ``(n_input, coord_dim)``.
        """
        return torch.from_numpy(key.coordinates(n_input, dim=self.coord_dim, purpose=self.name))

    def _input_layer(self, linear, key_encoder, n_features):
        return FeatureInputLinear.from_linear(linear, key_source=key_encoder, n_features=n_features)

    def _output_layer(self, linear, key_encoder):
        head = FeatureOutputLinear(linear.in_features, key_source=key_encoder)
        return head.to(linear.weight.device, linear.weight.dtype)

    def _vector(self, value, key_encoder):
        return FeatureVector(key_encoder, n_columns=0 if value.ndim == 1 else value.shape[1])
