"""The generated gRPC modules under stable names, the service names, and server reflection.

Reflection names come from the generated descriptors, never from string literals (as in grpc's
``helloworld`` reflection example). Our descriptors live in a private pool (see
:mod:`service.protogen`), so reflection is served from a pool that holds them together with the
health and reflection services' own files: ``grpcurl list`` then shows all four services and
``grpcurl describe`` works for each.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from service._generated import POOL
from service._generated.advdetect.v1 import detector_pb2, detector_pb2_grpc
from service._generated.inference import grpc_service_pb2 as oip_pb2
from service._generated.inference import grpc_service_pb2_grpc as oip_pb2_grpc

__all__ = [
    "POOL",
    "detector_pb2",
    "detector_pb2_grpc",
    "oip_pb2",
    "oip_pb2_grpc",
    "DETECTOR_SERVICE",
    "OIP_SERVICE",
    "HEALTH_SERVICE",
    "DETECTOR_METHODS",
    "OIP_METHODS",
    "SERVED_SERVICES",
    "reflection_pool",
    "reflection_service_names",
    "enable_reflection",
    "DetectOptions",
]

_DETECTOR = detector_pb2.DESCRIPTOR.services_by_name["Detector"]
_OIP = oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]

#: ``"advdetect.v1.Detector"``
DETECTOR_SERVICE: str = _DETECTOR.full_name
#: ``"inference.GRPCInferenceService"``
OIP_SERVICE: str = _OIP.full_name
#: ``"grpc.health.v1.Health"``
HEALTH_SERVICE: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: Method names of the native API, in proto order: Detect, DetectStream, GetBaselineInfo.
DETECTOR_METHODS: tuple[str, ...] = tuple(m.name for m in _DETECTOR.methods)
#: Method names of the Open Inference Protocol service, in proto order.
OIP_METHODS: tuple[str, ...] = tuple(m.name for m in _OIP.methods)
#: The application services (the ones metrics, limits and error mapping apply to).
SERVED_SERVICES: tuple[str, ...] = (DETECTOR_SERVICE, OIP_SERVICE)


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """A fresh descriptor pool with the Detector, OIP, health and reflection proto files.

    Returns
    -------
    DescriptorPool
        For ``reflection.enable_server_reflection(names, server, pool=...)``.
    """
    pool = descriptor_pool.DescriptorPool()
    for file in (detector_pb2.DESCRIPTOR, oip_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        pool.AddSerializedFile(file.serialized_pb)
    return pool


def reflection_service_names(*, health: bool = True) -> tuple[str, ...]:
    """The full names reflection lists: our two services, health (optional) and reflection itself."""
    names = [DETECTOR_SERVICE, OIP_SERVICE]
    if health:
        names.append(HEALTH_SERVICE)
    names.append(reflection.SERVICE_NAME)
    return tuple(names)


def enable_reflection(server: grpc.Server, *, health: bool = True) -> tuple[str, ...]:
    """Add the reflection service to ``server`` (before ``server.start()``); return the names listed."""
    names = reflection_service_names(health=health)
    reflection.enable_server_reflection(names, server, pool=reflection_pool())
    return names


class DetectOptions:
    """``advdetect.v1.DetectOptions`` with the defaults of unset fields applied (both true)."""

    __slots__ = ("return_probabilities", "include_scores")

    def __init__(self, return_probabilities: bool = True, include_scores: bool = True) -> None:
        self.return_probabilities = bool(return_probabilities)
        self.include_scores = bool(include_scores)

    @classmethod
    def from_proto(cls, options: detector_pb2.DetectOptions) -> DetectOptions:
        """Read the message; an unset field means true."""
        return cls(
            return_probabilities=options.return_probabilities if options.HasField("return_probabilities") else True,
            include_scores=options.include_scores if options.HasField("include_scores") else True,
        )

    def __repr__(self) -> str:
        return (
            f"DetectOptions(return_probabilities={self.return_probabilities}, include_scores={self.include_scores})"
        )
