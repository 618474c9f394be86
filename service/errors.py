"""The one place where exceptions become gRPC status codes, and the interceptor that applies it.

Domain errors (:mod:`detector.errors`) know nothing of gRPC. :data:`STATUS_TABLE` maps them, in
order, first match wins:

* ``ModelNotFound``                          -> NOT_FOUND
* ``detector.errors.InvalidInput``            -> INVALID_ARGUMENT
* ``detector.errors.NotReady``                -> UNAVAILABLE
* ``Overloaded``                             -> RESOURCE_EXHAUSTED
* ``ModelError``, ``BaselineError``, ``DataError`` -> FAILED_PRECONDITION
* ``TimeoutError``                           -> DEADLINE_EXCEEDED
* anything else                              -> INTERNAL

The client gets the exception's message (which says what was expected and what arrived, quoting
at most a short prefix of any client string), cut to :data:`MAX_DETAILS_CHARS`, except for
INTERNAL: a generic :data:`INTERNAL_MESSAGE`, with the traceback in the server log.

:class:`ServiceInterceptor` wraps the application services' handlers (not health or reflection):
it admits at most ``max_inflight`` calls (RESOURCE_EXHAUSTED at once beyond the bound, before the
request is parsed), lets at most ``workers`` admitted unary calls compute at once, maps exceptions
with the table, and, given a :class:`~service.metrics.ServiceMetrics`, counts every call by method and final
status code, times unary calls and tracks the in-flight gauge. This follows KServe's
``protocol/grpc/interceptors.py`` and MLServer's servicers: servicer methods stay a few lines.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from detector.errors import AdvDetectError, BaselineError, DataError, InvalidInput, ModelError, NotReady

if TYPE_CHECKING:  # pragma: no cover
    from service.metrics import ServiceMetrics

__all__ = [
    "ModelNotFound",
    "Overloaded",
    "STATUS_TABLE",
    "INTERNAL_MESSAGE",
    "MAX_DETAILS_CHARS",
    "status_for",
    "ServiceInterceptor",
]

logger = logging.getLogger(__name__)


class ModelNotFound(AdvDetectError, LookupError):
    """A request named a model this server does not serve."""


class Overloaded(AdvDetectError, RuntimeError):
    """The server is at its bound of requests in flight; the client should retry later."""


#: Ordered (exception type, status code); the first ``isinstance`` match wins.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelError, grpc.StatusCode.FAILED_PRECONDITION),
    (BaselineError, grpc.StatusCode.FAILED_PRECONDITION),
    # A data file the server itself reads (not the request) is unusable.
    (DataError, grpc.StatusCode.FAILED_PRECONDITION),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
)

#: What the client sees for an unexpected exception; the details go to the server log only.
INTERNAL_MESSAGE = "internal error in the advdetect server; the server log has the details"

#: Longest status message sent to a client (far below grpc's 8 KiB default metadata limit, so that
#: a long message never turns into a client-side RESOURCE_EXHAUSTED).
MAX_DETAILS_CHARS = 512


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and client-facing message for an exception.

    Parameters
    ----------
    exc : BaseException

    Returns
    -------
    (grpc.StatusCode, str)
        From :data:`STATUS_TABLE`, the message cut to :data:`MAX_DETAILS_CHARS`;
        ``(INTERNAL, INTERNAL_MESSAGE)`` for anything not in it.
    """
    for kind, code in STATUS_TABLE:
        if isinstance(exc, kind):
            message = str(exc) or type(exc).__name__
            if len(message) > MAX_DETAILS_CHARS:
                message = message[: MAX_DETAILS_CHARS - 3] + "..."
            return code, message
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def _split_method(full_method: str) -> tuple[str, str]:
    """``"/advdetect.v1.Detector/Detect"`` -> ``("advdetect.v1.Detector", "Detect")``."""
    _, _, rest = full_method.partition("/")
    service, _, method = rest.partition("/")
    return service, method


def _code_name(code: grpc.StatusCode | None) -> str:
    return "OK" if code is None else code.name


class ServiceInterceptor(grpc.ServerInterceptor):
    """Bound in-flight requests, map exceptions to statuses and record request metrics.

    Parameters
    ----------
    metrics : ServiceMetrics or None, default None
        When given: ``advdetect_requests_total{method,code}`` counts every call of the application
        services by its final status code (a stream counts once); ``advdetect_inflight_requests``
        follows the calls in progress; ``advdetect_request_duration_seconds{method}`` times unary
        calls (servicers of streaming methods time each message themselves).
    max_inflight : int or None, default None
        Calls in progress beyond which a new call fails at once with RESOURCE_EXHAUSTED;
        ``None`` for no bound. The server's executor must have a thread for each (plus those of
        health and reflection) so that the check runs before any queueing.
    services : tuple of str, default ``protocol.SERVED_SERVICES``
        Full service names the interceptor applies to; other services (health, reflection) pass
        through untouched, so a long health ``Watch`` never holds an in-flight slot.
    workers : int or None, default None
        Admitted unary calls that compute at once; the others wait for one to finish. ``None``
        for no bound. A stream computes in its own thread, bounded by ``max_inflight`` only.

    Notes
    -----
    A servicer may still call ``context.abort(code, message)`` itself: that status is kept (and
    counted) as is. Exceptions are mapped by :func:`status_for`; an unexpected one is logged with
    its traceback and the client gets INTERNAL with :data:`INTERNAL_MESSAGE`.
    """

    def __init__(
        self,
        metrics: ServiceMetrics | None = None,
        max_inflight: int | None = None,
        services: tuple[str, ...] | None = None,
        workers: int | None = None,
    ) -> None:
        if services is None:
            from service.protocol import SERVED_SERVICES

            services = SERVED_SERVICES
        if max_inflight is not None and max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1 or None, got {max_inflight}")
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.services = frozenset(services)
        self._lock = threading.Lock()
        self._inflight = 0
        self._compute = threading.Semaphore(workers) if workers is not None else contextlib.nullcontext()

    @property
    def inflight(self) -> int:
        """Calls of the application services in progress now."""
        return self._inflight

    # -- in-flight accounting -------------------------------------------------------------------
    def _enter(self) -> bool:
        with self._lock:
            if self.max_inflight is not None and self._inflight >= self.max_inflight:
                return False
            self._inflight += 1
        if self.metrics is not None:
            self.metrics.inflight_requests.inc()
        return True

    def _exit(self) -> None:
        with self._lock:
            self._inflight -= 1
        if self.metrics is not None:
            self.metrics.inflight_requests.dec()

    def _count(self, method: str, code: grpc.StatusCode | None) -> None:
        if self.metrics is not None:
            self.metrics.requests_total.labels(method=method, code=_code_name(code)).inc()

    def _reject_overloaded(self, method: str, context: grpc.ServicerContext) -> None:
        self._count(method, grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"server is at its limit of {self.max_inflight} requests in flight; retry later",
        )

    def _fail(self, exc: Exception, method: str, context: grpc.ServicerContext) -> None:
        """Count and re-raise an exception as the right status (always raises)."""
        already = context.code()
        if already is not None and already != grpc.StatusCode.OK:
            # The servicer aborted (or set a code) itself: keep its status.
            self._count(method, already)
            raise exc
        code, message = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            logger.exception("unhandled error in %s", method)
        else:
            logger.info("%s -> %s: %s", method, code.name, message)
        self._count(method, code)
        context.abort(code, message)

    # -- wrappers -------------------------------------------------------------------------------
    def _wrap_unary_response(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            if not self._enter():
                self._reject_overloaded(method, context)
            start = time.perf_counter()
            try:
                with self._compute:
                    response = behavior(request, context)
            except Exception as exc:
                self._fail(exc, method, context)
            finally:
                self._exit()
                if self.metrics is not None:
                    self.metrics.request_duration_seconds.labels(method=method).observe(
                        time.perf_counter() - start
                    )
            self._count(method, context.code())
            return response

        return wrapper

    def _wrap_stream_response(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            if not self._enter():
                self._reject_overloaded(method, context)
            try:
                yield from behavior(request, context)
            except GeneratorExit:
                # grpc closed the stream early: the client went away.
                self._count(method, grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:
                self._fail(exc, method, context)
            else:
                self._count(method, context.code())
            finally:
                self._exit()

        return wrapper

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split_method(handler_call_details.method)
        if service not in self.services:
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._wrap_unary_response(handler.unary_unary, method))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._wrap_unary_response(handler.stream_unary, method))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._wrap_stream_response(handler.unary_stream, method))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=self._wrap_stream_response(handler.stream_stream, method))
        return handler  # pragma: no cover - grpc handlers always have one behaviour
