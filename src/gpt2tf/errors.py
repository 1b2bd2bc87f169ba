"""The one exception type for mistakes a user can fix.

Library code raises `UserError` with a message that names the bad value and says how to fix it.
Only the edges turn it into something else: the CLIs print `error: <message>` and exit 1, the
server answers with a 4xx JSON error. Anything else that escapes is a bug and keeps its traceback.

A mistake in one setting raises `FieldError`, which keeps the setting's name apart from what is
wrong with it, so each edge can phrase it for its users (`--top_k ...` on the command line,
`top_k ...` with OpenAI's `param` in the server) without rewriting the library's words.
"""


class UserError(Exception):
    """Bad input the user can fix (a flag, a path, a file's contents)."""


class FieldError(UserError):
    """A bad value of one named setting: `field` is its name, `problem` what is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem

    def phrased(self, flag_prefix: str = "") -> str:
        """The message with the setting spelled as the edge's users write it (e.g. `--top_k`)."""
        return f"{flag_prefix}{self.field} {self.problem}"
