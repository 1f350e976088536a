"""User-facing models."""

from ._infl import INFL

__all__ = ["INFL"]
