"""The one exception type users see: the CLI prints it as a single line and exits non-zero."""


class SqltuneError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""
