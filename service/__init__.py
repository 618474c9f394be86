"""advdetect's gRPC service: native Detector API, Open Inference Protocol, metrics, audit log.

The service imports the detector library, grpcio, protobuf, prometheus_client and
pydantic-settings; never torch.
"""
