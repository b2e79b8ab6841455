"""The one exception type for problems a user can cause and fix."""


class LoraLabError(Exception):
    """A problem with the user's input or environment, with what to do about it.

    The UI shows the message in place; the CLI prints it and exits non-zero, without a traceback.
    """

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} {fix}".strip())
