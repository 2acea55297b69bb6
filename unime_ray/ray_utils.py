"""Starting or joining Ray: one function so every job behaves the same on a laptop and a cluster."""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import ray

# Ray's own loggers in this process: their INFO lines (Ray Data's execution plans, Serve's deployment
# steps, Train's controller) stay in Ray's session log files; warnings and errors still show.
QUIET_LOGGERS = ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune")
# Warnings Ray repeats on every start or poll that tell a user nothing to act on.
KNOWN_NOISE = (
    "Token authentication is enabled for this Ray cluster",  # every ray.init of a local Ray
    "Failed to query Ray Train Controller actor state",  # every poll without a dashboard (ray#65447)
)


class _KnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in KNOWN_NOISE)


def init_ray(address: str = "", num_cpus: int | None = None, verbose: bool = False) -> None:
    """Join `address` (or $RAY_ADDRESS, which `ray job submit` sets); with neither, start a local Ray
    bound to 127.0.0.1 (no dashboard). Two listeners upstream hard-codes to every interface remain, both
    on random ports and tested to be the only ones: each Serve replica's internal gRPC server (Ray 2.60)
    and torch.distributed's TCPStore on the rank-0 train worker.

    Not `verbose`: the workers' logs are not copied to this console (they stay in Ray's session log
    folder, named once here) and Ray's own INFO lines are hidden, so a job's console shows our stage
    lines and the progress bars of Ray Data and Ray Train; errors still reach the driver as exceptions."""
    if ray.is_initialized():
        return
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}
    if not verbose:
        # Importing Ray Data configures its logger (level DEBUG, an INFO console handler): import it
        # first, or a job that imports it after this point prints its execution plans and, with stdout
        # not a terminal (`ray job submit`, a log file), a progress report every 10 s.
        importlib.import_module("ray.data")

        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        for handler in logging.getLogger("ray").handlers:
            handler.addFilter(_KnownNoise())
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, **{"log_to_driver": True, **quiet})
    else:
        _single_node()
        # address="local": always a fresh local instance, never a stale `ray start` head found in /tmp/ray.
        ray.init(
            address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False, **quiet
        )
    if not verbose:
        context = ray.get_runtime_context()
        logs = Path(context.get_temp_dir()) / context.get_session_name() / "logs"
        print(f"[ray] Ray's own logs: {logs} (--verbose shows them here)", flush=True)


def _single_node() -> None:
    """Switch Ray's multi-node mode off for a local Ray, so that it keeps `_node_ip_address="127.0.0.1"`:
    with it on, Ray replaces a loopback address by the machine's routable one (ray/_private/services.py).
    No public API does this. The environment variable reaches the raylet and the workers; this process
    read it into a constant when it imported Ray, so the constant is set too. Private, like the Serve
    client `stop_serve` uses: re-check both on a Ray upgrade (the loopback tests fail if this breaks)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False


def start_serve(host: str, port: int, verbose: bool = False) -> None:
    """Start Ray Serve's HTTP proxy on host:port. Importing Ray Serve sets its logger back to INFO in
    this process (ray/serve/__init__.py), after `init_ray` quieted it: quiet it again, or the console
    shows Serve's deployment steps."""
    from ray import serve

    if not verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": host, "port": port})


def stop_serve(timeout_s: float = 60.0) -> None:
    """Shut Ray Serve down as `serve.shutdown()` does (applications, replicas, proxies, controller),
    without the line it makes Ray print on the console.

    `serve.shutdown()` waits on the controller's `graceful_shutdown` task until the controller, done,
    kills itself with `ray.kill`; Serve calls it with infinite retries, so its end is reported to the
    driver as "(raylet) Task ServeController.graceful_shutdown failed. There are infinite retries
    remaining ... killed by `ray.kill`" (Ray 2.60). Here the same call runs with no retries, so the
    controller's end is the expected `RayActorError` and nothing is printed; `serve.shutdown()` then
    only forgets the dead controller. Uses Serve's client object (`serve.context`), as `serve.shutdown`
    does."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.exceptions import RayServeException

    try:
        client = _get_global_client()
    except RayServeException:  # Serve is not running
        return
    client.shutdown_cached_handles()
    try:
        ray.get(client._controller.graceful_shutdown.options(max_task_retries=0).remote(), timeout=timeout_s)
    except ray.exceptions.RayActorError:
        pass  # the controller shut everything down, then itself
    serve.shutdown()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (every server of the tests and scripts binds loopback)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
