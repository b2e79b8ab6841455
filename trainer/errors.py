"""The one exception type for problems a user can cause and fix."""
import reprlib

MAX_MESSAGE = 1000  # characters of a problem or fix: a message never carries a whole uploaded value


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def shown(value, limit: int = 80) -> str:
    """`value` as a message may quote it: its repr for non-text, cut to `limit` characters."""
    # reprlib stops at a few items per level: the repr of a YAML alias bomb would be gigabytes.
    text = value if isinstance(value, str) else _SHORT.repr(value)
    text = text.replace("\x00", "\\0")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class LoraLabError(Exception):
    """A problem with the user's input or environment, with what to do about it.

    The UI shows the message in place; the CLI prints it and exits non-zero, without a traceback.
    """

    def __init__(self, problem: str, fix: str = ""):
        self.problem = shown(problem, MAX_MESSAGE)
        self.fix = shown(fix, MAX_MESSAGE)
        super().__init__(f"{self.problem} {self.fix}".strip())
