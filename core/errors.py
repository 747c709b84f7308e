"""The one exception family users see: the CLI prints its message as one line and exits non-zero."""


class ScfriskError(Exception):
    """An error in the user's input, data or configuration, with a message that says what to fix."""
