"""The one exception type every Quiver stage raises for bad input.

CLIs catch it and print its message as a single line (exit code 2); the service maps it to a 4xx. Anything else
escaping is a bug, not a user error.
"""


class QuiverError(Exception):
    """A user-facing error: the message names the file, line, key or field at fault."""
