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
