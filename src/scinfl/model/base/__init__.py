"""Base classes every scinfl model builds on: the key, and federated training."""

from ._federated import SITE_KEY, FederatedTrainingMixin
from ._keyed import KeyedModelMixin
from ._new_samples import NewSamplesMixin

__all__ = ["SITE_KEY", "FederatedTrainingMixin", "KeyedModelMixin", "NewSamplesMixin"]
