"""Generated package (``make protos``). Do not edit."""
