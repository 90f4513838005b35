"""User-facing errors: one line, names the problem and what to do, exit code 2."""


class UserError(Exception):
    """A mistake in the user's input (config, paths, data). Printed as one line, never a traceback."""


class IntegrityError(UserError):
    """An artifact on disk does not match its manifest (corrupted or truncated file)."""
