"""Torch modules: keyed INR layers, key encoders and the keyed VAE.

The superseded per-feature key modes (``key_mode="feature"``, ``"feature-inr"``) and their
layers are in :mod:`scinfl.module.experimental`.
"""

from . import experimental  # noqa: F401 (registers the superseded key modes in KEY_MODES)
from ._feature_scale import feature_moments, scale_from_moments
from ._key_encoder import CoordinateKeyEncoder
from ._key_modes import KEY_MODES, KeyMode, ModelKeyMode, PooledKeyMode, get_key_mode
from ._keyed_linear import PooledKeyedLinear
from ._keyify import keyify
from ._likelihood import NONZERO_KEY, nb_log_likelihood, standardised_normal_log_prob
from ._multimodal_vae import MultiModalKeyedVAE, observed_rows
from ._vae import KeyedVAE

__all__ = [
    "KEY_MODES",
    "NONZERO_KEY",
    "CoordinateKeyEncoder",
    "KeyMode",
    "KeyedVAE",
    "ModelKeyMode",
    "MultiModalKeyedVAE",
    "PooledKeyMode",
    "PooledKeyedLinear",
    "feature_moments",
    "get_key_mode",
    "keyify",
    "nb_log_likelihood",
    "observed_rows",
    "scale_from_moments",
    "standardised_normal_log_prob",
]
