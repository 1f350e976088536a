"""What the adversary holds: a site's upload, as the gradient of its loss on the shared parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.module._constants import MODULE_KEYS
from torch import nn
from torch.nn import functional as F

Gradients = dict[str, torch.Tensor]


def shared_parameter_names(module: nn.Module) -> list[str]:
    """Names of the trainable parameters that travel to the server (they are in the ``state_dict``).

    Parameters
    ----------
    module
        A scinfl module.

    Returns
    -------
    The names, in ``named_parameters`` order (the keys of an upload's gradients).

    Examples
    --------
    >>> from scinfl.module import KeyedVAE
    >>> names = shared_parameter_names(KeyedVAE(n_input=10, key_mode=None))
    >>> "px_r" in names
    True
    """
    state = module.state_dict(keep_vars=True)
    return [name for name, p in module.named_parameters() if p.requires_grad and name in state]


def client_loss(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    kl_weight: float = 1.0,
    stochastic: bool = False,
    soft_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss a site minimises on ``tensors`` (what :func:`scinfl.federated.client_update` differentiates).

    Parameters
    ----------
    module
        A :class:`~scinfl.module.KeyedVAE` (key set if keyed).
    tensors
        Registry tensors (``X``, ``batch``, ``labels``); ``X`` may require grad.
    kl_weight
        KL weight of the round.
    stochastic
        ``True``: the module's own forward pass as training runs it (dropout, sampled ``z``).
        ``False``: deterministic (dropout off, ``z`` = posterior mean) - the worst case for the
        defender, because the attacker can model the upload exactly.
    soft_labels
        ``(n, n_labels)`` label probabilities replacing the hard labels in the classification
        term (used by attackers that optimise labels, DLG-style).

    Returns
    -------
    Scalar loss tensor.

    Examples
    --------
    >>> import torch
    >>> from scinfl.module import KeyedVAE
    >>> vae = KeyedVAE(n_input=10, key_mode=None)
    >>> t = {"X": torch.ones(2, 10), "batch": torch.zeros(2, 1), "labels": torch.zeros(2, 1)}
    >>> client_loss(vae, t).ndim
    0
    """
    key_encoder = getattr(module, "key_encoder", None)
    reuse = key_encoder.reuse() if hasattr(key_encoder, "reuse") else contextlib.nullcontext()
    with reuse:
        if stochastic:
            _, _, out = module(dict(tensors), loss_kwargs={"kl_weight": kl_weight})
        else:
            inference_outputs = module.inference(**module._get_inference_input(tensors))
            inference_outputs[MODULE_KEYS.Z_KEY] = inference_outputs[MODULE_KEYS.QZ_KEY].loc
            generative_inputs = module._get_generative_input(tensors, inference_outputs)
            generative_outputs = module.generative(**generative_inputs)
            out = module.loss(tensors, inference_outputs, generative_outputs, kl_weight=kl_weight)
    loss = out.loss
    if soft_labels is not None and getattr(out, "logits", None) is not None:
        ratio = module.classification_ratio
        soft_ce = -(soft_labels * F.log_softmax(out.logits, dim=-1)).sum(-1).mean()
        loss = loss - ratio * out.classification_loss + ratio * soft_ce
    return loss


def upload_gradient(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    kl_weight: float = 1.0,
    stochastic: bool = False,
    seed: int | None = None,
) -> Gradients:
    """Gradient of a site's loss on ``tensors`` with respect to every shared parameter.

    With one SGD step of learning rate ``eta`` from the global parameters the server receives
    ``w_global - eta * grad``, so ``grad = (w_global - w_local) / eta`` (and one Adam step can be
    inverted too, see :func:`gradient_from_update`): this is exactly what the server holds.

    Parameters
    ----------
    module
        The site's module, holding the global parameters (and the key, if keyed).
    tensors
        The site's minibatch (one row = the one-sample worst case).
    kl_weight
        KL weight of the round.
    stochastic
        See :func:`client_loss`.
    seed
        Seed of dropout and of the sampled ``z`` when ``stochastic``.

    Returns
    -------
    ``{name: gradient}`` for every shared trainable parameter (zeros where unused).

    Examples
    --------
    >>> import torch
    >>> from scinfl.module import KeyedVAE
    >>> vae = KeyedVAE(n_input=10, key_mode=None)
    >>> t = {"X": torch.ones(1, 10), "batch": torch.zeros(1, 1), "labels": torch.zeros(1, 1)}
    >>> upload_gradient(vae, t)["px_r"].shape
    torch.Size([10])
    """
    was_training = module.training
    module.train(stochastic)
    try:
        if seed is not None:
            torch.manual_seed(seed)
        names = shared_parameter_names(module)
        params = dict(module.named_parameters())
        loss = client_loss(module, tensors, kl_weight=kl_weight, stochastic=stochastic)
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    finally:
        module.train(was_training)
    return {
        n: (torch.zeros_like(params[n]) if g is None else g).detach().clone()
        for n, g in zip(names, grads, strict=True)
    }


def gradient_from_update(
    global_parameters: Mapping[str, np.ndarray],
    local_parameters: Mapping[str, np.ndarray],
    lr: float,
    optimizer: str = "adam",
    eps: float = 0.01,
    weight_decay: float = 0.0,
) -> Gradients:
    """Recover the gradient of a one-step local update from the parameters a site returns.

    ``"sgd"``: ``g = (w_global - w_local) / lr``. ``"adam"`` (what
    :func:`~scinfl.federated.client_update` runs, a fresh optimizer each round): after one step
    ``w_local = w_global - lr * g / (|g| + eps)`` (bias correction makes the first moments ``g``
    and ``g^2``), which inverts entry-wise to ``g = eps * u / (1 - |u|)`` with
    ``u = (w_global - w_local) / lr``; Adam's L2 ``weight_decay * w_global`` is then removed.

    Parameters
    ----------
    global_parameters
        Parameters the server sent.
    local_parameters
        Parameters the site returned (:attr:`~scinfl.federated.ClientUpdate.parameters`).
    lr, eps, weight_decay
        The round's optimizer settings (the server chose them).
    optimizer
        ``"adam"`` or ``"sgd"``.

    Returns
    -------
    ``{name: gradient}`` for every floating-point parameter.

    Examples
    --------
    >>> import numpy as np
    >>> g = gradient_from_update({"w": np.ones(2)}, {"w": np.array([0.9, 1.1])}, lr=0.1, optimizer="sgd")
    >>> np.round(g["w"].numpy(), 6).tolist()
    [1.0, -1.0]
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}.")
    grads: Gradients = {}
    for name, w0 in global_parameters.items():
        w0 = np.asarray(w0)
        if not np.issubdtype(w0.dtype, np.floating):
            continue
        u = (w0.astype(np.float64) - np.asarray(local_parameters[name], dtype=np.float64)) / lr
        if optimizer == "sgd":
            g = u
        else:
            u = np.clip(u, -1 + 1e-12, 1 - 1e-12)
            g = eps * u / (1 - np.abs(u)) - weight_decay * w0
        grads[name] = torch.as_tensor(g, dtype=torch.float32)
    return grads


def make_tensors(
    x: torch.Tensor | np.ndarray,
    labels: np.ndarray | int | None = None,
    batch: np.ndarray | int | None = None,
) -> dict[str, torch.Tensor]:
    """Registry tensors for rows ``x`` (counts or values), with optional labels and batches.

    Parameters
    ----------
    x
        ``(n, p)`` rows, or one ``(p,)`` row.
    labels, batch
        Label and batch code of each row, ``(n,)`` (a scalar for one row; ``None``: all 0).

    Returns
    -------
    ``{"X": (n, p) float32, "batch": (n, 1) int64, "labels": (n, 1) int64}``, the minibatch a
    scinfl module reads.

    Examples
    --------
    >>> make_tensors(np.ones((2, 3)))["labels"].shape
    torch.Size([2, 1])
    """
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float32)
    if x.ndim == 1:
        x = x[None]
    n = x.shape[0]

    def codes(v):
        if v is None:
            return torch.zeros(n, 1, dtype=torch.long)
        return torch.as_tensor(np.asarray(v), dtype=torch.long).reshape(n, 1)

    return {
        REGISTRY_KEYS.X_KEY: x,
        REGISTRY_KEYS.BATCH_KEY: codes(batch),
        REGISTRY_KEYS.LABELS_KEY: codes(labels),
    }
