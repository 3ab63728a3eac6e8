"""Errors that carry a message meant for the user, not a traceback."""


class HpcdlError(Exception):
    """A problem with the user's input or environment; printed as one clear line."""


class ConfigError(HpcdlError):
    """A bad configuration value; the message names the key."""


class DataError(HpcdlError):
    """A bad or unreadable dataset; the message names the file and the dataset."""
