"""The one exception type whose message is meant for the user."""

__all__ = ["HeadvisError"]


class HeadvisError(Exception):
    """Bad input or an unmet requirement: the CLI prints the message alone and exits 2."""
