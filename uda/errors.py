"""Errors a user can fix. Entry points print them as one line, never as a traceback."""


class UdaError(Exception):
    """Base class: the message names the problem and the fix, on one line."""


class DatasetError(UdaError):
    """A dataset folder is missing, has the wrong layout, an empty split or an unparsable name."""


class CorruptImageError(DatasetError):
    """An image file cannot be decoded (corrupt or truncated)."""


class ConfigError(UdaError):
    """An unknown config key, a bad value or a bad --opts override."""


class ClusteringError(UdaError):
    """Features that cannot be clustered (NaN/inf, too few points) or a clustering that found no cluster."""
