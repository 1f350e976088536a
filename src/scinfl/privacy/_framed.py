"""What the server sees of a model trained under secret frames, with each key guess."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from scinfl.federated._parameters import get_shared_parameters, set_shared_parameters
from scinfl.federated._secret_frames import SecretFrames
from scinfl.key import Key

from ._attacks import attacker_module, wrong_key
from ._upload import Gradients

GradientView = Callable[[Gradients], Gradients]


def _identity(gradients: Gradients) -> Gradients:
    return gradients


def _as_torch(arrays: dict) -> Gradients:
    return {name: torch.as_tensor(value, dtype=torch.float32) for name, value in arrays.items()}


def framed_attackers(
    module: nn.Module,
    key: Key,
    frame: str | int,
    guesses: Sequence[str],
    seed: int | None = None,
) -> tuple[dict[str, nn.Module], dict[str, GradientView]]:
    """The attacker's modules and gradient views for a model whose parameters travel in frames.

    The server holds the global parameters in secret frame ``frame``
    (:class:`~scinfl.federated.SecretFrames`) and an upload's gradient with respect to them.
    This is the attacker's best case: the global model and every upload in the *same* frame
    (in a real run an upload is in another frame than the global model it started from, and a
    frame holds at most one upload per site, see :func:`~scinfl.federated.frame_id`). Each key guess decodes both with its own frames: ``"none"`` takes them as
    they are, ``"wrong"`` decodes with a key from the same generator (the one
    :func:`~scinfl.privacy.attacker_module` draws from ``seed``), ``"correct"`` with the key
    (the upper bound, the plain model). Key modes get the same guess
    (:func:`~scinfl.privacy.attacker_module`).

    Parameters
    ----------
    module
        The trained module (plain parameters, key set).
    key
        The federation's key.
    frame
        The frame the server holds the parameters in.
    guesses
        Key guesses among ``"none"``, ``"wrong"``, ``"correct"``.
    seed
        Seed of the wrong key.

    Returns
    -------
    ``(attackers, views)``: for each guess, the attacker's module (holding the parameters as
    the guess decodes them) and the map from a site's plain gradient to what the attacker
    reads from the upload.

    Examples
    --------
    >>> from scinfl.module import KeyedVAE
    >>> from scinfl import Key
    >>> attackers, views = framed_attackers(KeyedVAE(n_input=6, key_mode=None), Key.generate(), 1, ["none"])
    >>> sorted(attackers)
    ['none']
    """
    true_frames = SecretFrames(key)
    hidden = true_frames.encode(get_shared_parameters(module), frame)
    # every guess views the same upload: map it to the server's frame once, not once per guess
    last: list = [None, None]

    def server_view(gradients: Gradients) -> dict:
        if last[0] is not gradients:
            plain = {name: g.detach().cpu().numpy() for name, g in gradients.items()}
            last[:] = [gradients, true_frames.encode_gradient(plain, frame)]
        return last[1]

    attackers: dict[str, nn.Module] = {}
    views: dict[str, GradientView] = {}
    for guess in guesses:
        attacker = attacker_module(module, guess, seed=seed)
        if guess == "correct":
            attackers[guess], views[guess] = attacker, _identity
            continue
        if guess == "wrong":
            guess_frames = SecretFrames(wrong_key(seed))
        elif guess == "none":
            guess_frames = None
        else:
            raise ValueError(f"Unknown key guess {guess!r}; use 'none', 'wrong' or 'correct'.")
        if guess_frames is None:
            set_shared_parameters(attacker, hidden)
        else:
            set_shared_parameters(attacker, guess_frames.decode(hidden, frame))

        def view(gradients: Gradients, guess_frames=guess_frames) -> Gradients:
            seen = server_view(gradients)
            if guess_frames is not None:
                seen = guess_frames.decode_gradient(seen, frame)
            return _as_torch(seen)

        attackers[guess], views[guess] = attacker, view
    return attackers, views
