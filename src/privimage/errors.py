"""The one exception type that reaches users.

Anything the user can fix (a path, a config value, a budget) raises `UserError` with a single
sentence naming the problem and the fix; the CLI prints it as one line and exits with status 3 (2 is a bad command line).
Every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or configuration, phrased as `problem: fix`."""
