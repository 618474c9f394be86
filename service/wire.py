"""Parse every request from its raw bytes, so that one that is not valid protobuf gets INVALID_ARGUMENT.

grpc deserializes a request before the servicer (and its interceptors) see it, and answers a payload
that fails to parse with INTERNAL ("Exception deserializing request!"). That path also keeps memory:
in grpcio 1.81.1, about 19 kB per undecodable request on a plain server with only the health service,
and none when the same requests are parsed here (``bench/hostile.py``, section 5; grpc/grpc#36908
reports growth after exceptions in the same way). :class:`RawRequestInterceptor`
removes the deserializer of every method it sees (so grpc hands the handler the raw bytes) and
parses them in the handler instead:

* a unary request that does not parse ends the call with INVALID_ARGUMENT, naming the method;
* in a request stream, a message that does not parse ends the stream the same way, except in the
  methods given as ``per_message_errors`` (``DetectStream``): there the servicer receives an
  :class:`~detector.errors.InvalidInput` in the message's place, answers it with an error message,
  and the stream goes on.

It applies to every service, health and reflection included. Install it after
:class:`~service.errors.ServiceInterceptor`, so that admission comes before parsing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from detector.errors import InvalidInput

__all__ = ["RawRequestInterceptor", "undecodable"]


def undecodable(method: str, size: int) -> InvalidInput:
    """The error for a request message of ``size`` bytes that is not valid protobuf for ``method``."""
    return InvalidInput(f"the request message ({size} bytes) is not a valid protobuf message for {method}")


class RawRequestInterceptor(grpc.ServerInterceptor):
    """Hand handlers raw request bytes and parse them here (see the module docstring).

    Parameters
    ----------
    per_message_errors : frozenset of str
        Full method names (``/package.Service/Method``) of request-streaming methods whose servicer
        takes an :class:`~detector.errors.InvalidInput` in place of an undecodable message.
    """

    def __init__(self, per_message_errors: frozenset[str] = frozenset()) -> None:
        self.per_message_errors = per_message_errors

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        method = handler_call_details.method
        if not handler.request_streaming:
            kind = "unary_unary" if handler.unary_unary is not None else "unary_stream"
            wrap: Callable[..., Any] = _parsed_unary
        else:
            kind = "stream_unary" if handler.stream_unary is not None else "stream_stream"
            wrap = _parsed_stream
        behavior = getattr(handler, kind)
        replaced = wrap(behavior, parse, method, method in self.per_message_errors)
        return handler._replace(request_deserializer=None, **{kind: replaced})


def _parsed_unary(behavior: Callable[..., Any], parse: Callable[[bytes], Any], method: str,
                  _per_message: bool) -> Callable[..., Any]:
    def handler(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = parse(raw)
        except DecodeError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(undecodable(method, len(raw))))
        return behavior(request, context)

    return handler


def _parsed_stream(behavior: Callable[..., Any], parse: Callable[[bytes], Any], method: str,
                   per_message: bool) -> Callable[..., Any]:
    def messages(raw_messages: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        for raw in raw_messages:
            try:
                yield parse(raw)
            except DecodeError:
                error = undecodable(method, len(raw))
                if not per_message:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
                yield error

    def handler(raw_messages: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        return behavior(messages(raw_messages, context), context)

    return handler
