"""Flower's differential-privacy building blocks, and the check of the delta they are used at.

Flower is imported on first use (the ``flower`` extra).
"""

import logging

logger = logging.getLogger(__name__)


def flower_dp(what: str = 'privacy="dp"'):
    """Flower's DP mechanism, accounting types and RDP accountant, or the install hint."""
    try:
        from flwr.supercore import differential_privacy, privacy_accounting
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
    except ImportError as error:  # pragma: no cover - depends on the installed extras
        raise ImportError(
            f'{what} uses Flower\'s DP mechanism and accountant: pip install "scinfl[flower]".'
        ) from error
    return differential_privacy, privacy_accounting, RdpAccountant


def warn_of_a_large_delta(delta: float, n: int, what: str) -> None:
    """Warn when ``delta`` is not well below ``1 / n``: such a guarantee says little.

    With ``delta >= 1/n`` a mechanism that publishes one of the ``n`` members' data whole
    satisfies it; the usual choice is ``delta`` much smaller than ``1/n`` (the default 1e-5).

    Examples
    --------
    >>> warn_of_a_large_delta(1e-5, 3, "sites")
    """
    if delta * n >= 1:
        logger.warning(
            "dp_delta=%g is not below 1/n for n=%d %s: the guarantee allows one of them to be "
            "published whole. Choose dp_delta much smaller than 1/n (e.g. 1e-5).",
            delta,
            n,
            what,
        )
