"""Errors a user can act on: the message names the file (and line or id) and says what to do."""


class UserError(Exception):
    pass


def without_credentials(uri: str) -> str:
    """`uri` for messages: the user:password@ of a service URI dropped (postgresql://u:p@db/x ->
    postgresql://db/x); anything else, a path or a sentence, unchanged."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


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


def refusal(exc: BaseException) -> str | None:
    """What to do when an MLflow tracking server refused a request: not authenticated (401) or
    not permitted (403); None for any other error. Matched by name (MlflowException, its
    error_code and the status in its message) anywhere in the exception's chain, so this module
    imports no MLflow. Such a refusal is not retried: the same credentials get the same answer."""
    import os
    import re

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if "MlflowException" in {c.__name__ for c in type(exc).__mro__}:
            code, text = getattr(exc, "error_code", "") or "", str(exc)
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            if code == "UNAUTHENTICATED" or re.search(r"\b401\b", text):
                if user:
                    return (f"MLflow did not accept the credentials of user {user!r} (HTTP 401): check "
                            "MLFLOW_TRACKING_PASSWORD in this environment")
                return ("MLflow requires a login (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                        "(or MLFLOW_TRACKING_TOKEN) in the environment that runs visionflow; never in params.yaml")
            if code == "PERMISSION_DENIED" or re.search(r"\b403\b", text):
                detail = text.strip().splitlines()[0][:200] if text.strip() else code
                return (f"MLflow refused user {user or '(anonymous)'!r} permission for this (HTTP 403: {detail}); ask an "
                        "MLflow admin for EDIT on the experiment (to log runs) and MANAGE on the registered model "
                        "(to register versions and move aliases); see docs/scale-out.md")
        exc = exc.__cause__ or exc.__context__
    return None
