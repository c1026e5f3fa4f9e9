"""The one exception type for user errors: bad config, bad input, incompatible checkpoint.

Its message names the option, file or line and says what to do. Tracebacks are for bugs.
"""


class UserError(Exception):
    """An error the user can fix; entry points print its message without a traceback."""
