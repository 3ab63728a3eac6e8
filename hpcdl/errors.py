"""Errors that carry a message meant for the user, not a traceback."""


class HpcdlError(Exception):
    """A problem with the user's input or environment; printed as one clear line."""


class ConfigError(HpcdlError):
    """A bad configuration value; the message names the key."""


class DataError(HpcdlError):
    """A bad or unreadable dataset; the message names the file and the dataset."""


class TrialFailed(HpcdlError):
    """A failure every rank of a contained group agreed on (see `World.contained`): it ends the group's
    current work (a sweep's trial), not the job."""
