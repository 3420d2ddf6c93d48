"""The one exception type every user-caused failure raises.

It lives in `ir` because `ir` is the root of the import graph: every other
subpackage may import it, and the CLI turns it into a one-line message.
"""


class BrazeError(Exception):
    """A failure the user can act on; the message names the thing at fault, and `param`,
    when the fault is one request parameter (`top_p`, `prompt`), names it for the HTTP
    server's error body."""

    def __init__(self, *args, param: str | None = None):
        super().__init__(*args)
        self.param = param
