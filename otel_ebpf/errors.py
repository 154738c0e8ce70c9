"""The one exception type meant for users: the CLI prints it as a single line and exits 2."""


class UserError(Exception):
    """Something the user can fix: bad input, missing privilege, missing package.

    ``message`` says what is wrong, ``hint`` how to fix it; both are shown on one line.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
