"""The one error type users see.

Anything raised as EdgeLlamaError is reported by the CLI as a single line,
``edgellama: error: <message>``, with exit status 2. Everything else is a bug.
"""


class EdgeLlamaError(Exception):
    """Bad input or an unsupported request: a one-line, user-facing message."""
