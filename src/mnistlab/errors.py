"""The one error type users see: a message naming the problem and the fix."""


class MnistlabError(Exception):
    """A user-facing mistake or environment problem; the CLI prints it as one line."""
