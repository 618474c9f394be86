"""A cheap load generator for the overload phase of ``bench/hostile.py``: many callers, one thread.

``callers`` coroutines on one ``grpc.aio`` channel send the same pre-serialised ``ModelInfer`` request in a
closed loop for ``seconds``. A refused call (RESOURCE_EXHAUSTED) waits before its caller tries again:

- ``fixed``: always :data:`INITIAL_BACKOFF_S` (an impatient client);
- ``exponential``: gRPC's retry backoff (gRFC A6): the n-th consecutive refusal waits a uniform random time
  in [0, min(:data:`INITIAL_BACKOFF_S` * 2^(n-1), :data:`MAX_BACKOFF_S`)], and an answer resets n.

Running the callers as coroutines of one thread in a process of their own keeps the load generator's share of
a small machine's cores low, so that the server's latency under overload is not the client's. Prints one JSON
object: status codes and the admitted (OK) calls' p50 and p99 latency in ms as the client saw them.
Run: ``python bench/overload_client.py PORT CALLERS SECONDS REQUEST_FILE {fixed,exponential}``.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter

import grpc
import numpy as np

INFER = "/inference.GRPCInferenceService/ModelInfer"
INITIAL_BACKOFF_S = 0.02
MAX_BACKOFF_S = 1.0


async def closed_loop(port: int, callers: int, seconds: float, payload: bytes, policy: str) -> dict:
    """Status codes and the OK calls' latencies (ms) of ``callers`` coroutines over ``seconds``."""
    codes: Counter = Counter()
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    rng = random.Random(0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary(INFER)

        async def caller() -> None:
            refusals = 0
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    await infer(payload, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                    refusals += 1
                    cap = INITIAL_BACKOFF_S * 2 ** (refusals - 1) if policy == "exponential" else INITIAL_BACKOFF_S
                    await asyncio.sleep(rng.uniform(0, min(cap, MAX_BACKOFF_S)) if policy == "exponential" else cap)
                    continue
                latencies.append((time.perf_counter() - t0) * 1e3)
                codes["OK"] += 1
                refusals = 0

        await asyncio.gather(*(caller() for _ in range(callers)))
    ms = np.asarray(latencies)
    return {"codes": dict(codes), "p50": float(np.median(ms)) if ms.size else float("nan"),
            "p99": float(np.percentile(ms, 99)) if ms.size else float("nan")}


if __name__ == "__main__":
    port, callers, seconds, request_file, policy = sys.argv[1:6]
    if policy not in ("fixed", "exponential"):
        raise SystemExit(f"policy must be fixed or exponential, got {policy!r}")
    with open(request_file, "rb") as f:
        result = asyncio.run(closed_loop(int(port), int(callers), float(seconds), f.read(), policy))
    print(json.dumps(result))
