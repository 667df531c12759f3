"""Domain errors that carry their RPC status.

The status is a plain string (the gRPC code name) so that `core/` packages can raise these
without importing grpc; the one error interceptor in `libs.common.interceptors` maps them.
"""

from __future__ import annotations

from typing import ClassVar


class LiveloopError(Exception):
    """Base of every error a client may see. Subclasses set `status`."""

    status: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        self.message = f"{field}: {message}" if field else message
        super().__init__(self.message)


class InvalidArgument(LiveloopError):
    status = "INVALID_ARGUMENT"


class NotFound(LiveloopError):
    status = "NOT_FOUND"


class AlreadyExists(LiveloopError):
    status = "ALREADY_EXISTS"


class FailedPrecondition(LiveloopError):
    status = "FAILED_PRECONDITION"


class Unavailable(LiveloopError):
    status = "UNAVAILABLE"


class Unauthenticated(LiveloopError):
    status = "UNAUTHENTICATED"


class PermissionDenied(LiveloopError):
    status = "PERMISSION_DENIED"


class ResourceExhausted(LiveloopError):
    status = "RESOURCE_EXHAUSTED"


class Unimplemented(LiveloopError):
    status = "UNIMPLEMENTED"


class Aborted(LiveloopError):
    status = "ABORTED"
