"""User-facing errors: each says what is wrong and what to do about it."""


class IagnError(Exception):
    """An error caused by user input or environment; the CLI prints it without a traceback."""


class DataError(IagnError):
    """A dataset file is missing, malformed or inconsistent.

    `path` and `line` locate the problem (`unit` names what `line` counts, e.g. "record"
    for the entries of a .mat file); `hint` tells the user what to do.
    """

    def __init__(
        self,
        message: str,
        *,
        path: object = None,
        line: int | None = None,
        hint: str = "",
        unit: str = "line",
    ):
        self.path = path
        self.line = line
        self.hint = hint
        where = ""
        if path is not None:
            where = f"{path}" + (f", {unit} {line}" if line is not None else "") + ": "
        text = where + message
        if hint:
            text += f"\n  -> {hint}"
        super().__init__(text)


# 128 + SIGTERM: what a shell reports for a process killed by SIGTERM, so retry policies
# that treat "terminated" as retryable see the same code; distinct from a crash (1), a user
# error (2) and Ctrl-C (130).
EXIT_PREEMPTED = 143


class Preempted(SystemExit):
    """Training stopped on SIGTERM after saving where it was; the same command resumes.

    A SystemExit, not an IagnError: handlers that turn errors into exit code 1 or 2
    (`except Exception`, `except IagnError`) let it through, so the process exits with
    EXIT_PREEMPTED wherever the step was called from (CLI, KFP component, DVC stage).
    """

    def __init__(self, message: str):
        super().__init__(EXIT_PREEMPTED)
        self.message = message

    def __str__(self) -> str:
        return self.message
