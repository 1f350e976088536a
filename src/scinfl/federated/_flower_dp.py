"""Flower's differential-privacy building blocks, imported on first use (the ``flower`` extra)."""


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
