"""Typed operating errors. The API maps each kind to one gRPC status code."""

from __future__ import annotations

from dataclasses import dataclass, field


class TallyError(Exception):
    """An operating error a caller can act on; `code` names its gRPC status."""

    code = "INTERNAL"

    def __init__(self, message: str, *, field_name: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field_name = field_name


class InvalidArgument(TallyError):
    code = "INVALID_ARGUMENT"


class NotFound(TallyError):
    code = "NOT_FOUND"


class AlreadyExists(TallyError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(TallyError):
    code = "FAILED_PRECONDITION"


class Unavailable(TallyError):
    code = "UNAVAILABLE"


class DeadlineExceeded(TallyError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(TallyError):
    """No credentials, or ones the server does not accept (missing, malformed, unknown,
    expired, revoked). `reason` is counted in metrics; the message never says which
    account exists."""

    code = "UNAUTHENTICATED"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class PermissionDenied(TallyError):
    """A known principal acting outside its role or its accounts."""

    code = "PERMISSION_DENIED"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Shortfall:
    """What RESOURCE_EXHAUSTED reports: what could be spent and what was asked."""

    account_id: str
    operation: str
    available: int
    required: int
    budget_id: str = ""
    extra: dict[str, str] = field(default_factory=dict)


class ResourceExhausted(TallyError):
    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, shortfall: Shortfall, field_name: str = "") -> None:
        super().__init__(message, field_name=field_name)
        self.shortfall = shortfall


ERRORS_BY_CODE: dict[str, type[TallyError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Unavailable)
}
