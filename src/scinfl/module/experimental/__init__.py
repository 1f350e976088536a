"""Superseded per-feature key modes, kept for research: ``key_mode="feature"`` and ``"feature-inr"``.

They were designed so that no shared tensor has a row or column per feature (the encoder's
input layer, the decoder's per-feature heads and the dispersions are shared in a secret basis,
or generated from secret per-feature coordinates). The privacy audit (``docs/privacy.md``)
shows them superseded: secret frames, the default whenever a model holds a key, stop the same
one-upload attacks with the paper's ``pooled`` mode, also hide the model from the server, and
cost no utility, while the spectral alignment attack still breaks the per-feature modes and
``feature-inr`` loses 10 to 32 points of accuracy. They stay here, registered in
:data:`scinfl.module.KEY_MODES`, so that ``benchmarks/privacy.py`` regenerates the published
tables; building a model with them logs a warning.
"""

from scinfl.module._key_modes import KEY_MODES

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

KEY_MODES.update({FeatureKeyMode.name: FeatureKeyMode, InrFeatureKeyMode.name: InrFeatureKeyMode})

__all__ = [
    "BasisInputLinear",
    "BasisOutputLinear",
    "BasisVector",
    "FeatureInputLinear",
    "FeatureKeyEncoder",
    "FeatureKeyMode",
    "FeatureOutputLinear",
    "FeatureVector",
    "InrFeatureKeyMode",
    "SecretBasis",
]
