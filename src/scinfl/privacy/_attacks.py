"""Reconstruction attacks on a site's upload: analytic first-layer inversion and gradient inversion."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from torch import nn
from torch.nn import functional as F

from scinfl.key import Key

from ._upload import Gradients, client_loss, shared_parameter_names

logger = logging.getLogger(__name__)

KeyGuess = Literal["none", "wrong", "correct"] | Key


def wrong_key(seed: int | None = None) -> Key:
    """The attacker's wrong key: one from the same generator, from ``seed`` when given."""
    return Key.generate() if seed is None else Key(np.random.default_rng(seed).bytes(32))


def attacker_module(
    module: nn.Module, key: KeyGuess = "none", seed: int | None = None
) -> nn.Module:
    """The adversary's copy of a model: same architecture and shared parameters, its own key guess.

    The server knows the architecture, every shared parameter and the key *generator*, not the
    key. Without the key it can still build the keyed architecture and must put something in
    place of the secret material:

    - ``"none"``: the key material replaced by zeros (every secret coordinate at the origin)
      and, with a classifier, the identity class order;
    - ``"wrong"``: a key drawn from the same generator (:meth:`scinfl.Key.generate`);
    - a :class:`~scinfl.Key`: the correct key (the upper bound of every attack);
    - ``"correct"``: the key material ``module`` holds (the upper bound, without the
      :class:`~scinfl.Key` object).

    An unkeyed module (``key_mode=None``) is copied as it is.

    Parameters
    ----------
    module
        The model holding the parameters the attacker knows (the global ones of the round).
    key
        ``"none"``, ``"wrong"``, ``"correct"`` or a :class:`~scinfl.Key`.
    seed
        With ``"wrong"``, draw the wrong key deterministically from this seed (for
        reproducible audits); by default from the OS.

    Returns
    -------
    A new module (the input is not modified).

    Examples
    --------
    >>> from scinfl.module import KeyedVAE
    >>> vae = KeyedVAE(n_input=10)
    >>> bad = attacker_module(vae, "none")
    >>> float(bad.key_encoder.coordinates.abs().sum())
    0.0
    """
    attacker = copy.deepcopy(module)
    if getattr(attacker, "key_encoder", None) is None:
        return attacker
    mode = attacker._key_mode
    if isinstance(key, Key):
        attacker.set_key(key)
    elif key == "wrong":
        attacker.set_key(wrong_key(seed))
    elif key == "correct":
        if not attacker.has_key:
            raise ValueError("key='correct' needs a module with its key set.")
    elif key == "none":
        shape = mode.key_material(Key(b"\0" * 32), attacker.n_input).shape
        attacker.key_encoder.set_coordinates(torch.zeros(shape))
        if getattr(attacker, "classifier", None) is not None:
            # without the key, any class order is a guess; the identity is as good as any
            attacker.set_class_order(torch.arange(attacker.n_labels))
    else:
        raise ValueError(f"key must be 'none', 'wrong', 'correct' or a scinfl.Key, got {key!r}.")
    return attacker


def input_layer(module: nn.Module) -> tuple[str, nn.Linear]:
    """Name and module of the first linear layer of the encoder (the one that reads the input).

    Parameters
    ----------
    module
        A scinfl module (its encoder is ``z_encoder``).

    Returns
    -------
    ``(name, layer)``: the layer's dotted name in ``module`` and the layer.

    Raises
    ------
    ValueError
        When the encoder has no linear layer.

    Examples
    --------
    >>> from scinfl.module import KeyedVAE
    >>> input_layer(KeyedVAE(n_input=10, key_mode=None))[0]
    'z_encoder.encoder.fc_layers.Layer 0.0'
    """
    for name, sub in module.named_modules():
        if name.startswith("z_encoder") and isinstance(sub, nn.Linear):
            return name, sub
    raise ValueError("No linear layer found in the module's z_encoder.")


def output_layer(module: nn.Module, prefix: str) -> tuple[str, nn.Linear]:
    """Name and module of the last linear layer under ``prefix`` (e.g. ``"classifier"``).

    Parameters
    ----------
    module
        A scinfl module.
    prefix
        Dotted name of the submodule to search (``"classifier"``, ``"decoder"``, ...).

    Returns
    -------
    ``(name, layer)``: the layer's dotted name in ``module`` and the layer.

    Raises
    ------
    ValueError
        When there is no linear layer under ``prefix``.

    Examples
    --------
    >>> from scinfl.module import KeyedVAE
    >>> output_layer(KeyedVAE(n_input=10, n_labels=3, classify=True, key_mode=None), "classifier")[0]
    'classifier.3'
    """
    found = [
        (n, m)
        for n, m in module.named_modules()
        if n.startswith(prefix) and isinstance(m, nn.Linear)
    ]
    found = [
        (n, m) for n, m in found if not any(o != n and n.startswith(o + ".") for o, _ in found)
    ]
    if not found:
        raise ValueError(f"No linear layer under {prefix!r}.")
    return found[-1]


def analytic_inversion(
    gradients: Gradients,
    layer_name: str,
    weight: str = "weight",
    bias: str = "bias",
) -> np.ndarray:
    """Input of a linear layer recovered from a one-sample gradient: ``x = dL/dW_i / dL/db_i``.

    For ``h = W x + b`` and one sample, ``dL/dW = delta x^T`` and ``dL/db = delta``, so every row
    ``i`` with ``delta_i != 0`` gives ``x`` exactly; the row with the largest ``|dL/db_i|`` is used.
    A row-wise rescaling of ``W`` (the pooled keyed layer) only rescales the result.

    Parameters
    ----------
    gradients
        ``{name: gradient}``, e.g. from :func:`upload_gradient` or :func:`gradient_from_update`.
    layer_name
        Prefix of the layer's parameters (see :func:`input_layer`).
    weight, bias
        Names of the weight and bias inside the layer.

    Returns
    -------
    The layer's input, shape ``(in_features,)``. For a count model's encoder this is
    ``log1p(x)`` (followed by any covariate columns).

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(4, 3)
    >>> x = torch.tensor([[1.0, 2.0, 0.0, 3.0]])
    >>> layer(x).pow(2).sum().backward()
    >>> grads = {"weight": layer.weight.grad, "bias": layer.bias.grad}
    >>> np.round(analytic_inversion(grads, "", "weight", "bias"), 4).tolist()
    [1.0, 2.0, 0.0, 3.0]
    """
    prefix = f"{layer_name}." if layer_name else ""
    dw = gradients[prefix + weight].double()
    db = gradients[prefix + bias].double()
    row = int(db.abs().argmax())
    if float(db[row].abs()) == 0.0:
        logger.warning("The bias gradient of %r is zero: nothing to invert.", layer_name)
        return np.zeros(dw.shape[1])
    return (dw[row] / db[row]).numpy()


def analytic_attack(attacker: nn.Module, gradients: Gradients) -> np.ndarray:
    """Analytic inversion of the encoder's first layer, mapped back to feature space.

    For an ordinary or pooled-keyed first layer the inversion is the input itself. For a layer
    that reads the features through secret per-feature embeddings (``key_mode="feature"``) it
    is a projection ``E^T x``; the attacker maps it back with the embeddings of its own key
    guess (minimum-norm solution), which is exact only with the correct key.

    Parameters
    ----------
    attacker
        The adversary's module (:func:`attacker_module`).
    gradients
        The upload.

    Returns
    -------
    Reconstruction of the encoder input (``log1p`` counts for count models), ``(n_input,)``.

    Examples
    --------
    >>> from scinfl.module import KeyedVAE
    >>> from scinfl.privacy import make_tensors, upload_gradient
    >>> vae = KeyedVAE(n_input=10, key_mode=None)
    >>> x = np.arange(10.0)
    >>> rec = analytic_attack(vae, upload_gradient(vae, make_tensors(x)))
    >>> bool(np.allclose(rec, np.log1p(x), atol=1e-4))
    True
    """
    name, layer = input_layer(attacker)
    lift = getattr(layer, "lift", None)
    if lift is None:
        return analytic_inversion(gradients, name)[: attacker.n_input]
    y = analytic_inversion(gradients, name, weight=layer.projected_weight_name)
    with torch.no_grad():
        return lift(torch.as_tensor(y, dtype=torch.float32)).double().numpy()


def _lift_per_feature(
    attacker: nn.Module, gradients: Gradients, module_path: str, shared: str, plain: str, call
) -> torch.Tensor:
    """Gradient of a per-feature tensor recovered from the gradient of what is shared.

    The per-feature tensor is a linear function ``v = M(w)`` of a shared one (``M`` = identity
    without a per-feature key); the upload holds ``M^T dL/dv``. The attacker solves for
    ``dL/dv`` by least squares with ``M`` of its own key guess.
    """
    if module_path in ("", None):
        raise ValueError("module_path is required.")
    if f"{module_path}.{shared}" not in gradients:  # no per-feature key: the tensor travels as is
        return gradients[f"{module_path}.{plain}"].double()
    sub = attacker.get_submodule(module_path)
    param = getattr(sub, shared).detach()

    def per_feature(w):
        return call(sub, w)

    jac = torch.autograd.functional.jacobian(per_feature, param).reshape(-1, param.numel()).double()
    target = gradients[f"{module_path}.{shared}"].double().reshape(-1)
    return torch.linalg.lstsq(jac.T, target[:, None], driver="gelsd").solution[:, 0]


def _nb_dispersion_gradient(x, mu, theta):
    """``d(-log NB(x; mu, theta)) / d log(theta)``, elementwise (numpy)."""
    from scipy.special import digamma

    return -theta * (
        digamma(x + theta)
        - digamma(theta)
        + np.log(theta / (theta + mu))
        + 1
        - (x + theta) / (theta + mu)
    )


def decoder_inversion(attacker: nn.Module, gradients: Gradients, n_grid: int = 400) -> np.ndarray:
    """Reconstruct a one-sample input from the *decoder's* gradients alone (count models).

    The encoder is not used. For a negative-binomial VAE with per-gene dispersion:

    1. the decoder's first layer gives its input, the latent ``z`` (analytic inversion);
    2. the attacker's own decoder then gives the expression proportions ``rho(z)`` and the
       dispersions ``theta``;
    3. the output bias gradient is ``delta_k = l rho_k (s_k - S)`` with
       ``s_k = theta_k (mu_k - x_k) / (mu_k (mu_k + theta_k))`` and ``mu = l rho``, so given the
       library ``l`` every ``x_k`` follows (``S`` is fixed by ``sum_k x_k = l``);
    4. ``l`` is the value on a grid whose ``x`` best explains the dispersion gradient.

    With a per-feature key the per-feature gradients are recovered with the attacker's key guess
    (:func:`_lift_per_feature`); they are right only with the right key.

    Parameters
    ----------
    attacker
        The adversary's module (:func:`attacker_module`); ``gene_likelihood="nb"``,
        ``dispersion="gene"``.
    gradients
        A one-sample upload.
    n_grid
        Grid size over the library size (50 to 10^5, log-spaced).

    Returns
    -------
    Reconstructed ``log1p`` counts, ``(n_input,)``.

    Examples
    --------
    >>> from scinfl.module import KeyedVAE
    >>> from scinfl.privacy import make_tensors, upload_gradient
    >>> vae = KeyedVAE(n_input=30, key_mode=None)
    >>> x = np.random.default_rng(0).poisson(5.0, 30).astype(float)
    >>> rec = decoder_inversion(vae, upload_gradient(vae, make_tensors(x)))
    >>> bool(np.corrcoef(rec, np.log1p(x))[0, 1] > 0.99)
    True
    """
    if (
        getattr(attacker, "gene_likelihood", None) != "nb"
        or getattr(attacker, "dispersion", None) != "gene"
    ):
        raise NotImplementedError(
            "decoder_inversion supports gene_likelihood='nb' with dispersion='gene'."
        )
    first = next(
        n
        for n, m in attacker.named_modules()
        if n.startswith("decoder.px_decoder") and isinstance(m, nn.Linear)
    )
    inp = analytic_inversion(gradients, first)
    n_latent = attacker.n_latent
    z = torch.as_tensor(inp[:n_latent], dtype=torch.float32)[None]
    batch = torch.zeros(1, 1, dtype=torch.long)
    if len(inp) > n_latent:
        batch[:] = int(np.argmax(inp[n_latent:]))
    head_path = "decoder.px_scale_decoder.0"
    with torch.no_grad():
        hidden = attacker.decoder.px_decoder(z, batch)
        rho = torch.softmax(attacker.get_submodule(head_path)(hidden), -1)[0].double().numpy()
        theta = torch.exp(attacker.px_r).double().numpy().reshape(-1)

    def bias_of(head, w):
        zeros = torch.zeros(1, head.in_features, dtype=w.dtype)
        return torch.func.functional_call(head, {"feature_bias": w}, (zeros,))[0]

    def dispersion_of(vector, w):
        return torch.func.functional_call(vector, {"weight": w}, (torch.empty(0, dtype=w.dtype),))

    delta = _lift_per_feature(
        attacker, gradients, head_path, "feature_bias", "bias", bias_of
    ).numpy()
    if "px_r" in gradients:
        g_r = gradients["px_r"].double().numpy()
    else:
        path = "parametrizations.px_r.0"
        g_r = _lift_per_feature(attacker, gradients, path, "weight", "px_r", dispersion_of).numpy()
    rho = np.clip(rho, 1e-12, None)

    def counts_for(lib):
        mu = lib * rho
        c = mu * (mu + theta) / theta
        shift = -np.sum(delta * (mu + theta) / theta) / np.sum(c)
        return mu - (delta / (lib * rho) + shift) * c, mu

    best, best_x = np.inf, np.zeros_like(rho)
    for lib in np.exp(np.linspace(np.log(50.0), np.log(1e5), n_grid)):
        x, mu = counts_for(lib)
        x = np.maximum(x, 0.0)
        err = np.sum((_nb_dispersion_gradient(x, mu, theta) - g_r) ** 2)
        if np.isfinite(err) and err < best:
            best, best_x = err, x
    return np.log1p(best_x)


def decoder_bias_attack(attacker: nn.Module, gradients: Gradients) -> np.ndarray:
    """The negated per-feature gradient of the decoder's output bias, as a reconstruction.

    For one sample it is the residual of the sample against the model's expected profile
    (``-delta_k`` grows with ``x_k - mu_k``): the simplest view of the decoder-side leak.

    Parameters
    ----------
    attacker
        The adversary's module (:func:`attacker_module`): its key guess lifts the keyed bias
        to per-feature values.
    gradients
        The upload's gradients, by parameter name (:func:`upload_gradient`).

    Returns
    -------
    ``(n_input,)``: the reconstruction, one value per feature.

    Examples
    --------
    >>> from scinfl.module import KeyedVAE
    >>> from scinfl.privacy import make_tensors, upload_gradient
    >>> vae = KeyedVAE(n_input=30, key_mode=None)
    >>> decoder_bias_attack(vae, upload_gradient(vae, make_tensors(np.ones(30)))).shape
    (30,)
    """

    def bias_of(head, w):
        zeros = torch.zeros(1, head.in_features, dtype=w.dtype)
        return torch.func.functional_call(head, {"feature_bias": w}, (zeros,))[0]

    path = "decoder.px_scale_decoder.0"
    return -_lift_per_feature(attacker, gradients, path, "feature_bias", "bias", bias_of).numpy()


def class_of_unit(attacker: nn.Module, unit: int) -> int:
    """The class an attacker reads from a classifier output unit, through its key guess.

    A keyed model carries each class on a secret output unit
    (:meth:`~scinfl.module.KeyedVAE.set_class_order`); the attacker can only map units to
    classes through the order its own key guess gives.

    Parameters
    ----------
    attacker
        The adversary's module (:func:`attacker_module`).
    unit
        Index of a classifier output unit.

    Returns
    -------
    The class code the attacker reads (``unit`` itself for an unkeyed class order).

    Examples
    --------
    >>> import torch
    >>> from scinfl.module import KeyedVAE
    >>> vae = KeyedVAE(n_input=10, n_labels=3, classify=True, key_mode=None)
    >>> class_of_unit(vae, 2)
    2
    >>> vae.set_class_order(torch.tensor([2, 0, 1]))
    >>> class_of_unit(vae, 2)
    0
    """
    order = getattr(attacker, "class_order", None)
    if order is None:
        return int(unit)
    return int((order == unit).nonzero()[0, 0])


def infer_label(gradients: Gradients, layer_name: str = "classifier.3") -> int:
    """Label inference of iDLG: the output unit whose bias has the most negative gradient.

    With softmax cross-entropy, ``dL/db_u = p_u - [u = unit of y]`` is negative only for the
    unit of the true class of a one-sample upload. On an unkeyed model the unit is the class;
    on a keyed one, :func:`class_of_unit` maps it through the attacker's key guess.

    Parameters
    ----------
    gradients
        The upload's gradients, by parameter name.
    layer_name
        Name of the classifier's output layer (:func:`output_layer`).

    Returns
    -------
    The output unit of the upload's label.

    Examples
    --------
    >>> import torch
    >>> infer_label({"out.bias": torch.tensor([0.2, -0.7, 0.5])}, "out")
    1
    """
    return int(gradients[f"{layer_name}.bias"].argmin())


@dataclass
class Reconstruction:
    """Result of a gradient-inversion attack.

    Attributes
    ----------
    x
        Reconstructed encoder input, ``(n, n_input)``: ``log1p`` counts for count models.
    labels
        Recovered labels (``None`` without a classifier).
    loss
        Best value of the objective (gradient distance, plus the prior term if any).
    history
        The objective every 50 iterations.
    key_material
        The key material the adaptive attacker ended with (``optimize_key=True``), else
        ``None``.

    Examples
    --------
    >>> result = Reconstruction(x=np.zeros((1, 3)), labels=None, loss=0.25, history=[1.0, 0.25])
    >>> result.x.shape, result.loss, result.key_material is None
    ((1, 3), 0.25, True)
    """

    x: np.ndarray
    labels: np.ndarray | None
    loss: float
    history: list[float] = field(default_factory=list)
    key_material: np.ndarray | None = None


def _distance(dummy, target, kind: str) -> torch.Tensor:
    if kind == "cosine":
        dot = sum((d * t).sum() for d, t in zip(dummy, target, strict=True))
        nd = torch.sqrt(sum(d.pow(2).sum() for d in dummy))
        nt = torch.sqrt(sum(t.pow(2).sum() for t in target))
        return 1 - dot / (nd * nt + 1e-12)
    return sum((d - t).pow(2).sum() for d, t in zip(dummy, target, strict=True))


@dataclass
class DummyBatch:
    """The rows and labels a gradient-matching attacker optimises (see :func:`dlg_init`).

    Attributes
    ----------
    x
        The dummy rows in the space they are optimised in: ``v`` with
        ``log1p(counts) = softplus(v)`` for count models (so that counts stay non-negative),
        the values themselves otherwise; ``(n, n_input)``.
    labels
        Fixed labels ``(n, 1)``: inferred (iDLG), given, or zeros (optimised or no classifier).
    label_logits
        Soft labels optimised with the rows (``labels="optimize"``), else ``None``.
    counts
        Whether the model reads counts.
    classify
        Whether the model has a classifier.

    Examples
    --------
    >>> dummy = DummyBatch(x=nn.Parameter(torch.zeros(1, 3)), labels=torch.zeros(1, 1))
    >>> dummy.profile().tolist()  # log1p counts: softplus(0) = log(2)
    [[0.6931471824645996, 0.6931471824645996, 0.6931471824645996]]
    """

    x: nn.Parameter
    labels: torch.Tensor
    label_logits: nn.Parameter | None = None
    counts: bool = True
    classify: bool = False

    def profile(self) -> torch.Tensor:
        """The rows as the encoder reads them: ``log1p`` counts, or the values.

        Returns
        -------
        ``(n, n_input)``: ``softplus(x)`` for count models, ``x`` otherwise (differentiable).

        Examples
        --------
        >>> dummy = DummyBatch(x=nn.Parameter(torch.zeros(1, 2)), labels=torch.zeros(1, 1), counts=False)
        >>> dummy.profile().tolist()
        [[0.0, 0.0]]
        """
        return F.softplus(self.x) if self.counts else self.x

    def inputs(self) -> torch.Tensor:
        """The rows as the model's data: counts, or the values.

        Returns
        -------
        ``(n, n_input)``: ``expm1(softplus(x))`` for count models (non-negative, not
        integers), ``x`` otherwise (differentiable).

        Examples
        --------
        >>> dummy = DummyBatch(x=nn.Parameter(torch.zeros(1, 2)), labels=torch.zeros(1, 1))
        >>> dummy.inputs().tolist()  # expm1(log(2)) = 1
        [[1.0, 1.0]]
        """
        return torch.expm1(F.softplus(self.x)) if self.counts else self.x


def dlg_init(
    attacker: nn.Module,
    gradients: Gradients,
    n_samples: int = 1,
    labels: Literal["infer", "optimize"] | int | np.ndarray = "infer",
    init: Literal["random", "mean"] | np.ndarray = "random",
    reference: np.ndarray | None = None,
    seed: int = 0,
) -> DummyBatch:
    """Set up gradient inversion: the dummy rows and their labels (first step of :func:`dlg`).

    Parameters
    ----------
    attacker
        The adversary's module (:func:`attacker_module`).
    gradients
        The upload; with ``labels="infer"`` its classifier output bias gives the label (iDLG:
        :func:`infer_label`, mapped to a class by :func:`class_of_unit`).
    n_samples, labels, init, reference, seed
        As for :func:`dlg`.

    Returns
    -------
    :class:`DummyBatch`.

    Examples
    --------
    >>> from scinfl.module import KeyedVAE
    >>> from scinfl.privacy import make_tensors, upload_gradient
    >>> vae = KeyedVAE(n_input=10, n_labels=3, classify=True, key_mode=None)
    >>> grads = upload_gradient(vae, make_tensors(np.arange(10.0), labels=np.array([2])))
    >>> dummy = dlg_init(vae, grads)
    >>> tuple(dummy.x.shape), dummy.labels.view(-1).tolist()
    ((1, 10), [2])
    """
    p_in = attacker.n_input
    counts = getattr(attacker, "gene_likelihood", "nb") != "normal"
    gen = torch.Generator().manual_seed(seed)
    if isinstance(init, str) and init == "mean":
        if reference is None:
            raise ValueError("init='mean' needs reference=, the public mean profile.")
        start = (
            torch.as_tensor(np.asarray(reference), dtype=torch.float32)
            .expand(n_samples, p_in)
            .clone()
        )
    elif isinstance(init, str):
        start = torch.rand(n_samples, p_in, generator=gen) * (1.0 if counts else 2.0)
        if not counts:
            start = start - 1.0
    else:
        start = (
            torch.as_tensor(np.asarray(init), dtype=torch.float32).reshape(n_samples, p_in).clone()
        )
    if counts:  # inverse softplus of the log1p profile
        start = torch.where(start > 20, start, torch.log(torch.expm1(start.clamp_min(1e-4))))

    classify = getattr(attacker, "classifier", None) is not None
    label_logits = None
    fixed_labels = torch.zeros(n_samples, 1, dtype=torch.long)
    if classify:
        if isinstance(labels, str) and labels == "infer":
            unit = infer_label(gradients, output_layer(attacker, "classifier")[0])
            fixed_labels[:] = class_of_unit(attacker, unit)
        elif isinstance(labels, str) and labels == "optimize":
            n_labels = output_layer(attacker, "classifier")[1].out_features
            label_logits = nn.Parameter(torch.randn(n_samples, n_labels, generator=gen) * 0.1)
        else:
            fixed_labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(
                n_samples, 1
            )
    return DummyBatch(
        x=nn.Parameter(start),
        labels=fixed_labels,
        label_logits=label_logits,
        counts=counts,
        classify=classify,
    )


def dlg_optimize(
    attacker: nn.Module,
    gradients: Gradients,
    dummy: DummyBatch,
    distance: Literal["cosine", "l2"] = "cosine",
    n_iter: int = 500,
    lr: float = 0.1,
    reference: np.ndarray | None = None,
    parameter_names: list[str] | None = None,
    kl_weight: float = 1.0,
    optimize_key: bool = False,
    prior_weight: float = 0.0,
    prior_scale: np.ndarray | None = None,
) -> tuple[float, list[float], np.ndarray | None]:
    """Gradient matching: optimise ``dummy`` so that its gradient matches the upload.

    The second step of :func:`dlg`. Adam on the dummy rows (and soft labels, and with
    ``optimize_key`` the key material), decayed 10x at 3/8, 5/8 and 7/8 of the run; the
    dummy ends at the iterate of lowest objective. The attacker module keeps its parameters
    and key material.

    Parameters
    ----------
    attacker
        The adversary's module (:func:`attacker_module`).
    gradients
        The upload.
    dummy
        From :func:`dlg_init`; updated in place.
    distance, n_iter, lr, reference, parameter_names, kl_weight, optimize_key, prior_weight, prior_scale
        As for :func:`dlg`.

    Returns
    -------
    The lowest objective, the objective every 50 iterations, and the key material at the
    lowest objective (``optimize_key=True``, else ``None``).

    Examples
    --------
    >>> from scinfl.module import KeyedVAE
    >>> from scinfl.privacy import make_tensors, upload_gradient
    >>> vae = KeyedVAE(n_input=10, key_mode=None)
    >>> grads = upload_gradient(vae, make_tensors(np.arange(10.0)))
    >>> dummy = dlg_init(vae, grads)
    >>> loss, history, _ = dlg_optimize(vae, grads, dummy, n_iter=20)
    >>> len(history), loss <= history[0]
    (1, True)
    """
    attacker.eval()
    names = parameter_names or [
        n
        for n in shared_parameter_names(attacker)
        if n in gradients and float(gradients[n].abs().sum()) > 0
    ]
    params = dict(attacker.named_parameters())
    target = [gradients[n].to(params[n].dtype) for n in names]
    prior = _profile_prior(attacker, prior_weight, reference, prior_scale)
    key_encoder = getattr(attacker, "key_encoder", None)
    saved_material = _check_key_guess(key_encoder) if optimize_key else None
    material = None if saved_material is None else saved_material.detach().clone()
    if material is not None:
        material.requires_grad_(True)
    variables = [v for v in (dummy.x, dummy.label_logits, material) if v is not None]
    best_variables = [v.detach().clone() for v in variables]
    optimizer = torch.optim.Adam(variables, lr=lr)
    milestones = [int(n_iter * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    best, history = np.inf, []
    for p in attacker.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    if material is not None:
        # a leaf tensor in place of the buffer, so that the gradient reaches the coordinates
        key_encoder._buffers["coordinates"] = material
    try:
        for it in range(n_iter):
            grads = torch.autograd.grad(
                client_loss(attacker, **_dummy_loss_inputs(dummy), kl_weight=kl_weight),
                [params[n] for n in names],
                create_graph=True,
                allow_unused=True,
            )
            pairs = [(d, t) for d, t in zip(grads, target, strict=True) if d is not None]
            dist = _distance([d for d, _ in pairs], [t for _, t in pairs], distance)
            if prior is not None:
                dist = dist + prior_weight * ((dummy.profile() - prior[0]) / prior[1]).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            dist.backward()
            optimizer.step()
            scheduler.step()
            value = float(dist.detach())
            if np.isfinite(value) and value < best:
                best, best_variables = value, [v.detach().clone() for v in variables]
            if it % 50 == 0:
                history.append(value)
    finally:
        for p in attacker.parameters():
            p.requires_grad_(True)
        if saved_material is not None:
            key_encoder._buffers["coordinates"] = saved_material
    with torch.no_grad():  # the dummy ends at its best iterate
        for variable, value in zip(variables, best_variables, strict=True):
            variable.copy_(value)
    return best, history, None if material is None else best_variables[-1].numpy()


def _dummy_loss_inputs(dummy: DummyBatch) -> dict:
    """The minibatch and soft labels of the dummy's current iterate, for :func:`client_loss`."""
    tensors = {
        REGISTRY_KEYS.X_KEY: dummy.inputs(),
        REGISTRY_KEYS.BATCH_KEY: torch.zeros(dummy.x.shape[0], 1, dtype=torch.long),
        REGISTRY_KEYS.LABELS_KEY: dummy.labels,
    }
    logits = dummy.label_logits
    return {
        "tensors": tensors,
        "soft_labels": None if logits is None else torch.softmax(logits, -1),
    }


def _check_key_guess(key_encoder: nn.Module | None) -> torch.Tensor:
    """The key material to start ``optimize_key`` from, or an error saying why there is none."""
    if key_encoder is None:
        raise ValueError("optimize_key=True needs a keyed module.")
    if not getattr(key_encoder, "differentiable", False):
        raise ValueError(
            f"The key material of {type(key_encoder).__name__} is discrete; optimize_key "
            "works for the 'pooled' and 'feature-inr' key modes."
        )
    if key_encoder.coordinates is None:
        raise ValueError("optimize_key=True starts from a key guess: see attacker_module().")
    return key_encoder.coordinates


def _profile_prior(
    attacker: nn.Module,
    prior_weight: float,
    reference: np.ndarray | None,
    prior_scale: np.ndarray | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Mean and scale of the public profile the dummy is pulled to (``prior_weight > 0``)."""
    if prior_weight <= 0:
        return None
    if reference is None:
        raise ValueError("prior_weight > 0 needs reference=, the public mean profile.")
    scale = np.ones(attacker.n_input) if prior_scale is None else np.asarray(prior_scale)
    return (
        torch.as_tensor(np.asarray(reference), dtype=torch.float32),
        torch.as_tensor(np.maximum(scale, 1e-6), dtype=torch.float32),
    )


def dlg_labels(dummy: DummyBatch) -> np.ndarray | None:
    """Label recovery of gradient inversion (last step of :func:`dlg`).

    The most likely class of each row's optimised soft labels (``labels="optimize"``), else
    the fixed labels (inferred by iDLG or given); ``None`` for a model without a classifier.

    Parameters
    ----------
    dummy
        The optimised dummy batch (:func:`dlg_optimize`).

    Returns
    -------
    ``(n,)`` class codes (output units: see :func:`class_of_unit` for a keyed model), or
    ``None``.

    Examples
    --------
    >>> logits = nn.Parameter(torch.tensor([[0.1, 2.0, -1.0]]))
    >>> dummy = DummyBatch(torch.zeros(1, 4), torch.zeros(1, 1), logits, classify=True)
    >>> dlg_labels(dummy).tolist()
    [1]
    """
    if not dummy.classify:
        return None
    if dummy.label_logits is not None:
        return dummy.label_logits.detach().argmax(-1).numpy()
    return dummy.labels.view(-1).numpy()


def dlg(
    attacker: nn.Module,
    gradients: Gradients,
    n_samples: int = 1,
    labels: Literal["infer", "optimize"] | int | np.ndarray = "infer",
    distance: Literal["cosine", "l2"] = "cosine",
    n_iter: int = 500,
    lr: float = 0.1,
    init: Literal["random", "mean"] | np.ndarray = "random",
    reference: np.ndarray | None = None,
    parameter_names: list[str] | None = None,
    kl_weight: float = 1.0,
    optimize_key: bool = False,
    prior_weight: float = 0.0,
    prior_scale: np.ndarray | None = None,
    seed: int = 0,
) -> Reconstruction:
    """Gradient inversion: optimise a dummy input so that its gradient matches the upload.

    ``distance="cosine"`` is *inverting gradients* (Geiping et al. 2020: ``1 - cos`` over all
    shared parameters, Adam with step decay); ``"l2"`` is the original *DLG* (Zhu et al. 2019).
    Labels are inferred from the classifier's output bias (*iDLG*, Zhao et al. 2020), optimised
    jointly as soft labels (DLG), or given. The dummy is parametrised in ``log1p`` space
    (``x = expm1(softplus(v))`` for counts), so reconstructions are non-negative.

    Three steps, each a function of its own: :func:`dlg_init` (the dummy rows and labels),
    :func:`dlg_optimize` (gradient matching) and :func:`dlg_labels` (label recovery).

    Parameters
    ----------
    attacker
        The adversary's module holding the global parameters and its key guess
        (:func:`attacker_module`).
    gradients
        The upload (:func:`upload_gradient`, :func:`gradient_from_update`).
    n_samples
        Number of rows to reconstruct (the upload's batch size, which the server knows).
    labels
        ``"infer"``, ``"optimize"`` or the labels.
    distance
        ``"cosine"`` or ``"l2"``.
    n_iter, lr
        Adam iterations and learning rate (decayed 10x at 3/8, 5/8 and 7/8 of the run).
    init
        ``"random"``, ``"mean"`` (start from ``reference``, the public mean ``log1p`` profile) or
        an array.
    reference
        Public mean profile (for ``init="mean"``).
    parameter_names
        Match only these parameters (default: every shared parameter with a non-zero upload);
        e.g. the decoder's to audit it on its own.
    kl_weight
        KL weight of the attacked round.
    optimize_key
        The *adaptive* attacker: optimise the key material jointly with the dummy, starting
        from the attacker's key guess (the pooled mode's secret coordinates, or the
        ``feature-inr`` mode's per-feature coordinates; the ``feature`` mode's secret
        permutations are discrete and cannot be optimised this way). The material found is in
        :attr:`Reconstruction.key_material`; the attacker module keeps its own.
    prior_weight, prior_scale
        Public data as a prior: adds ``prior_weight * mean(((x - reference) / prior_scale)^2)``
        (in ``log1p`` space for counts) to the matching loss; ``prior_scale`` is the public
        standard deviation per feature (default 1).
    seed
        Seed of the dummy initialisation.

    Returns
    -------
    :class:`Reconstruction`.

    Examples
    --------
    >>> from scinfl.module import KeyedVAE
    >>> from scinfl.privacy import make_tensors, upload_gradient
    >>> vae = KeyedVAE(n_input=10, key_mode=None)
    >>> grads = upload_gradient(vae, make_tensors(np.arange(10.0)))
    >>> rec = dlg(vae, grads, n_iter=20)
    >>> rec.x.shape
    (1, 10)
    """
    dummy = dlg_init(attacker, gradients, n_samples, labels, init, reference, seed)
    loss, history, key_material = dlg_optimize(
        attacker,
        gradients,
        dummy,
        distance=distance,
        n_iter=n_iter,
        lr=lr,
        reference=reference,
        parameter_names=parameter_names,
        kl_weight=kl_weight,
        optimize_key=optimize_key,
        prior_weight=prior_weight,
        prior_scale=prior_scale,
    )
    return Reconstruction(
        x=dummy.profile().detach().double().numpy(),
        labels=dlg_labels(dummy),
        loss=loss,
        history=history,
        key_material=key_material,
    )
