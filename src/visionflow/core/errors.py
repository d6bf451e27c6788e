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


class ServiceError(UserError):
    """A service a stage talks to (MLflow, FiftyOne's database) could not be reached or kept
    failing after the retries: names the service, where it was looked for, and the stage."""

    def __init__(self, service: str, uri: str, stage: str, cause: str, *, attempts: int = 1):
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{stage}: {service} at {uri} failed{tries}: {cause}")
        self.service, self.uri, self.stage, self.cause, self.attempts = service, uri, stage, cause, attempts

    def __reduce__(self):  # pickled across a process pool: rebuilt from its fields, not its message
        return _service_error, (self.service, self.uri, self.stage, self.cause, self.attempts)


def _service_error(service: str, uri: str, stage: str, cause: str, attempts: int) -> ServiceError:
    return ServiceError(service, uri, stage, cause, attempts=attempts)
