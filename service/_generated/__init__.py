"""Generated gRPC stubs (``make protos``, see ``service/protogen.py``). Do not edit.

Every message here is registered in :data:`POOL`, a descriptor pool of its own, not in protobuf's
default pool: ``tritonclient`` defines the same ``inference.*`` names in the default pool.
"""

from google.protobuf import descriptor_pool as _descriptor_pool

#: The descriptor pool holding ``advdetect/v1/detector.proto`` and ``inference/grpc_service.proto``.
POOL = _descriptor_pool.DescriptorPool()
