"""One error tree for Cohort, translated to gRPC status codes in one place.

::

    CohortError                      base; never raised directly
    ├── ConfigError                  bad configuration file, key or value (names the key path)
    ├── CertificateError             missing, unreadable, expired or wrongly-issued certificate or key
    ├── DataError                    a site's data does not match the task's schema (names file and column)
    ├── TaskError                    a task plug-in cannot be loaded or does not fit the job
    └── RpcError                     errors that cross the wire; each maps to one gRPC status
        ├── InvalidArgument          malformed request, wrong tensor names/shapes/dtypes, digest mismatch
        ├── Unauthenticated          no usable peer certificate
        │   └── ForeignFederation    the certificate names another federation (its O)
        ├── PermissionDenied         the certificate's site or role may not do this
        │   └── CertificateRevoked   the certificate, or its site, is on the coordinator's deny-list
        ├── NotFound                 unknown job, round or model version
        ├── FailedPrecondition       the request does not fit the current state (wrong task digest, no job ...)
        ├── AlreadyExists            a different update for the same (job, round, site) was already accepted
        ├── ResourceExhausted        size or rate limits
        │   └── RateLimited          too many calls; carries a retry hint (``retry_after_s``)
        ├── DeadlineExceeded         the round's deadline passed, or an upload stalled or ran past its deadline
        └── Aborted                  the round was cancelled while the request was in flight

Servicers raise these; :func:`status_for` maps them to a status code and a public message. Anything else is a bug:
it becomes INTERNAL with a generic message, and the detail goes to the log only (never to the peer), so no stack
trace, path or data value leaks over the wire.
"""

from __future__ import annotations

import grpc


class CohortError(Exception):
    """Base of every error Cohort raises on purpose."""


class ConfigError(CohortError):
    """A configuration error; the message names the bad key path (e.g. ``job.rounds``)."""


class CertificateError(CohortError):
    """A certificate or key is missing, unreadable, expired, or not issued for this purpose."""


class DataError(CohortError):
    """A site's data files do not fit the task's declared schema."""


class TaskError(CohortError):
    """A task plug-in cannot be loaded or does not fit the job."""


class RpcError(CohortError):
    """An error that is reported to the peer with :attr:`code` and the exception's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidArgument(RpcError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(RpcError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ForeignFederation(Unauthenticated):
    """The caller's certificate chains to a trusted CA but names another federation in its O.

    Like a revoked certificate, its holder can repeat the call at will, so the refusal is audited once per window.
    """


class PermissionDenied(RpcError):
    code = grpc.StatusCode.PERMISSION_DENIED


class CertificateRevoked(PermissionDenied):
    """The caller's certificate (by serial or fingerprint) or its site id is on the deny-list.

    A revoked peer can repeat its calls at will, so the coordinator audits these refusals at most once per window
    and caller (with a count), not once per call.
    """


class NotFound(RpcError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(RpcError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(RpcError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(RpcError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RateLimited(ResourceExhausted):
    """Too many calls from one caller (or from everyone): retry after ``retry_after_s`` seconds.

    ``audit_kind`` names the (throttled) audit event the refusal is recorded as.
    """

    def __init__(self, message: str, retry_after_s: float, audit_kind: str = "rate_limited") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.audit_kind = audit_kind


class DeadlineExceeded(RpcError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(RpcError):
    code = grpc.StatusCode.ABORTED


INTERNAL_MESSAGE = "internal error in the coordinator; the operator can find details in its log"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and public message for ``exc``."""
    if isinstance(exc, RpcError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


# Trailing metadata of a rate-limited call (RESOURCE_EXHAUSTED): milliseconds until a retry may succeed.
RETRY_AFTER_KEY = "cohort-retry-after-ms"

# Status codes a client may retry: the peer is temporarily unreachable or busy.
RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
