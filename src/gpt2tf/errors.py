"""The one exception type for mistakes a user can fix.

Library code raises `UserError` with a message that names the bad value and says how to fix it.
Only the edges turn it into something else: the CLIs print `error: <message>` and exit 1, the
server answers with a 4xx JSON error. Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input the user can fix (a flag, a path, a file's contents)."""
