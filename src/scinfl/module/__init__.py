"""Torch modules: keyed INR layers, key encoders and the keyed VAE."""

from ._feature_key import (
    BasisInputLinear,
    BasisOutputLinear,
    BasisVector,
    FeatureInputLinear,
    FeatureKeyEncoder,
    FeatureKeyMode,
    FeatureOutputLinear,
    FeatureVector,
    InrFeatureKeyMode,
    SecretBasis,
)
from ._feature_scale import feature_moments, scale_from_moments
from ._key_encoder import CoordinateKeyEncoder
from ._key_modes import KEY_MODES, PooledKeyMode, get_key_mode
from ._keyed_linear import PooledKeyedLinear
from ._keyify import keyify
from ._vae import KeyedVAE

__all__ = [
    "KEY_MODES",
    "BasisInputLinear",
    "BasisOutputLinear",
    "BasisVector",
    "CoordinateKeyEncoder",
    "FeatureInputLinear",
    "FeatureKeyEncoder",
    "FeatureKeyMode",
    "FeatureOutputLinear",
    "FeatureVector",
    "InrFeatureKeyMode",
    "KeyedVAE",
    "PooledKeyMode",
    "PooledKeyedLinear",
    "SecretBasis",
    "feature_moments",
    "get_key_mode",
    "keyify",
    "scale_from_moments",
]
