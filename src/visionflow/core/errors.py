"""Errors a user can act on: the message names the file (and line or id) and says what to do."""


class UserError(Exception):
    pass


class DataError(UserError):
    """Bad input data: names the file and the record (line, image id or annotation id)."""

    def __init__(self, file, message: str, *, record: str | None = None, hint: str | None = None):
        where = f"{file}" + (f" [{record}]" if record else "")
        text = f"{where}: {message}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)
        self.file, self.record = str(file), record
