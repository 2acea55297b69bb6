"""Starting or joining Ray: one function so every job behaves the same on a laptop and a cluster."""

from __future__ import annotations

import os

import ray


def init_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Join `address` (or $RAY_ADDRESS, which `ray job submit` sets); with neither, start a local Ray
    bound to 127.0.0.1 (no dashboard). Two listeners upstream hard-codes to every interface remain, both
    on random ports and tested to be the only ones: each Serve replica's internal gRPC server (Ray 2.60)
    and torch.distributed's TCPStore on the rank-0 train worker."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Ray turns "127.0.0.1" into the machine's routable address unless multi-node is off; a local
    # Ray is one node, so switch it off here (env for the raylet and workers, constant for this process).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    # address="local": always a fresh local instance, never a stale `ray start` head found in /tmp/ray.
    ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False)
