"""User-facing errors: one paragraph that names the problem and the fix."""


class MetalstmError(Exception):
    """A problem with the user's config, data, checkpoint or command line.

    The message is shown to the user as is (no traceback); it must say what is wrong,
    where we looked and how to fix it.
    """


class ConfigError(MetalstmError):
    """An impossible or unknown configuration value."""


class DataError(MetalstmError):
    """Missing, corrupt or inconsistent data."""


class CheckpointError(MetalstmError):
    """A checkpoint or run directory that cannot be used."""


class ResourceError(MetalstmError):
    """The machine lacks what the run needs (memory, a device)."""
