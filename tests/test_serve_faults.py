"""The Serve app under faults and load, on 127.0.0.1: replica loss (an Embedder replica, then the
Index replica, killed under 32 closed-loop clients: zero client errors), autoscaling (the Embedder
1 -> 2 -> 1 replicas, read from `serve.status()`), client disconnects and slow bodies (nothing lasting,
other clients' latency unchanged), all on one app with the tiny model (a redeploy would restart every
replica), with autoscaling delays of seconds and the Ingress's limits set so that 32 clients are never
shed. Overload (a quick 503 + Retry-After, the accepted requests' p99 bounded) runs on a second app
whose ~75M embedder, not the HTTP path, bounds the throughput. Every load is bounded in clients and
seconds; latency bounds are relative to a baseline measured in the same test. Figures for these
scenarios: `bench/serve_load.py`."""

from __future__ import annotations

import asyncio
import json
import random
import select
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import ray
import yaml
from conftest import free_port
from ray import serve

from unime_ray.config import Config, ModelConfig
from unime_ray.models.tiny import make_tiny
from unime_ray.serve.app import build_app
from unime_ray.serve.index import build_index

APP = "unime-faults"
OVERLOAD_APP = "unime-overload"
REPO = Path(__file__).parents[1]
INSTRUCTION = "Find me an everyday image that matches the given caption:"
TEXTS = ["a red circle on the left", "a blue square at the top", "two green triangles", "an orange shape"]


@pytest.fixture(scope="module")
def app(local_ray, tiny_qwen, world, tmp_path_factory):
    """The app without a reranker; the Embedder autoscales as `jobs/configs/serve.yaml` says, from its
    minimum up to 2 replicas (this machine's 2 CPUs, one each), with a lower target (below), delays of
    seconds, not minutes, and a 1 s health check so a killed replica is replaced within seconds. The
    Ingress takes 32 requests at once and queues 32 more at the proxy: 32 closed-loop clients never
    fill the queue (at most 31 others wait when one arrives)."""
    cfg = Config()
    cfg.run.output_dir = str(tmp_path_factory.mktemp("serve-faults"))
    cfg.data.image_root = str(world / "images")
    cfg.embedder = ModelConfig(path=str(tiny_qwen), image_size=56, max_length=256, batch_size=16)
    build_index(cfg, world / "retrieval" / "captions.jsonl")
    deployments = yaml.safe_load((REPO / "jobs" / "configs" / "serve.yaml").read_text())["applications"][0]
    auto = next(d for d in deployments["deployments"] if d["name"] == "Embedder")["autoscaling_config"]
    s = cfg.serve
    e = s.embedder
    e.min_replicas, e.max_replicas = auto["min_replicas"], min(2, auto["max_replicas"])
    # The file's target (16 requests in flight per replica: a GPU's batch) is about what the tiny
    # model's Embedder sees under 32 clients on 2 cores (2-18 measured: the proxy and the Ingress, not
    # the model, bound the throughput here), so the replica count would flap around it; 1 is below.
    assert auto["target_ongoing_requests"] > 1
    e.target_ongoing_requests = 1
    e.upscale_delay_s, e.downscale_delay_s, e.look_back_period_s, e.metrics_interval_s = 1.0, 3.0, 2.0, 0.5
    e.health_check_period_s = s.index.health_check_period_s = 1.0
    s.ingress.max_ongoing_requests, s.ingress.max_queued_requests, s.ingress.retry_after_s = 32, 32, 1.0
    s.body_timeout_s = 4.0
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    yield cfg, f"http://127.0.0.1:{port}"
    serve.shutdown()


def body(rng: random.Random) -> dict:
    return {"query": {"text": rng.choice(TEXTS), "instruction": INSTRUCTION}, "top_k": 5}


class Load:
    """POST /v1/search on a background thread from entering the block for `limit_s` seconds (leaving the
    block waits for the answers), or until `stop()`: `clients` closed-loop clients, or with `rate`,
    requests arriving at `rate` per second (Poisson, seeded: new users who do not wait for each other).
    Records (end time, latency s, status, Retry-After header) of every request; a transport error is
    status 0."""

    def __init__(self, url: str, clients: int, limit_s: float, rate: float | None = None):
        self.url, self.clients, self.limit_s, self.rate = url + "/v1/search", clients, limit_s, rate
        self.records: list[tuple[float, float, int, str | None]] = []
        self.errors: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.main, daemon=True)

    def main(self) -> None:
        try:
            asyncio.run(self.run())
        except Exception as error:  # the test sees it in `errors`
            self.errors.append(f"load generator: {error!r}")

    async def post(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        start = time.monotonic()
        try:
            response = await http.post(self.url, json=body(rng))
            status, retry = response.status_code, response.headers.get("retry-after")
            if status not in (200, 503):
                self.errors.append(f"{status}: {response.text[:300]}")
        except Exception as error:
            status, retry = 0, None
            self.errors.append(repr(error))
        end = time.monotonic()
        self.records.append((end, end - start, status, retry))

    async def run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        if self.rate is not None:
            rng = random.Random(0)
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None), timeout=120) as http:
                tasks, arrival = [], time.monotonic()
                while arrival < deadline and not self.done.is_set():
                    await asyncio.sleep(max(0.0, arrival - time.monotonic()))
                    tasks.append(asyncio.create_task(self.post(http, rng)))
                    arrival += rng.expovariate(self.rate)
                await asyncio.gather(*tasks)
            return
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(limits=limits, timeout=120) as http:

            async def client(seed: int) -> None:
                rng = random.Random(seed)
                while not self.done.is_set() and time.monotonic() < deadline:
                    await self.post(http, rng)

            await asyncio.gather(*(client(i) for i in range(self.clients)))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop now: each client ends after its request in progress."""
        self.done.set()
        self.join()

    def join(self) -> None:
        self.thread.join(self.limit_s + 130)
        assert not self.thread.is_alive()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.done.set()
        self.join()

    def latencies(self, status: int = 200, since: float = 0.0) -> np.ndarray:
        return np.array([lat for end, lat, st, _ in self.records if st == status and end >= since])

    def qps(self, start: float, end: float) -> float:
        return sum(1 for t, _, st, _ in self.records if st == 200 and start <= t < end) / (end - start)


def replicas(deployment: str, state: str = "RUNNING") -> int:
    return serve.status().applications[APP].deployments[deployment].replica_states.get(state, 0)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25) -> float:
    """Seconds until `predicate()` held; fails the test after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(interval)
    return time.monotonic() - start


def replica_actor_names(deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    )


def kill_replica(deployment: str, replica: str | None = None) -> str:
    """ray.kill replica `replica` (Serve's replica id) of `deployment`, or its first by name."""
    name = f"SERVE_REPLICA::{APP}#{deployment}#{replica}" if replica else replica_actor_names(deployment)[0]
    ray.kill(ray.get_actor(name, namespace="serve"))
    return name


def ingress_stats() -> dict:
    return serve.get_deployment_handle("Ingress", APP).stats.remote().result(timeout_s=30)


def embedder_stats() -> dict:
    return serve.get_deployment_handle("Embedder", APP).stats.remote().result(timeout_s=30)


def busy_embedder() -> str:
    """Serve's id of an Embedder replica with embed calls in it right now (so killing it kills calls)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = embedder_stats()
        if stats["ongoing"] >= 2:
            return stats["replica"]
    raise AssertionError("no Embedder replica had embed calls in it")


def embedder_inputs_by_replica(calls: int) -> dict[str, int]:
    """Inputs embedded so far by each Embedder replica that answered one of `calls` stats calls."""
    seen = {}
    for _ in range(calls):
        stats = embedder_stats()
        seen[stats["replica"]] = stats["inputs"]
    return seen


def test_embedder_scales_up_under_load_and_down_after(app):
    _, url = app
    wait_for(lambda: replicas("Embedder") == 1, 30, "the Embedder at its minimum of 1 replica")
    seen: dict[str, list[int]] = {}  # replica -> its input count at each stats call that reached it

    def both_embedding() -> bool:
        """Both replicas took embed calls (a replica counts from 0 when it starts, and the second one
        started under this load). Serve routes each stats call to the less busy replica, so one sample
        can miss the other one; the samples add up."""
        for replica, inputs in embedder_inputs_by_replica(4).items():
            seen.setdefault(replica, []).append(inputs)
        return len(seen) == 2 and all(max(n) > 0 for n in seen.values())

    with Load(url, clients=32, limit_s=180) as load:
        up = wait_for(lambda: replicas("Embedder") == 2, 120, "2 Embedder replicas under load")
        wait_for(both_embedding, 60, "both Embedder replicas embedding under load")
        load.stop()
    down = wait_for(lambda: replicas("Embedder") == 1, 30, "back to 1 Embedder replica after the load")
    print(f"scaled up {up:.1f} s into the load, down {down:.1f} s after it; inputs seen {seen}")
    assert not load.errors, load.errors[:3]


def status(deployment: str) -> str:
    return serve.status().applications[APP].deployments[deployment].status


def replaced(deployment: str, killed_at: float) -> bool:
    """Serve has noticed the death (its health check runs every second here; 3 s allow for a slow
    controller) and reports the deployment with a running replica and not UNHEALTHY again."""
    return (
        time.monotonic() - killed_at > 3 and replicas(deployment) >= 1 and status(deployment) != "UNHEALTHY"
    )


def test_replica_loss_costs_no_client_errors(app):
    """32 clients; an Embedder replica with calls in it is killed, then (once Serve has replaced it) the
    Index replica. The calls seen in the replica may all have ended in the moment before the kill (a
    tiny model's call takes milliseconds): then no call is left to retry, and the Embedder is killed
    again once replaced, up to three times."""
    _, url = app
    wait_for(lambda: replicas("Embedder") >= 1 and replicas("Index") == 1, 30, "the app up")
    retried = ingress_stats()
    back, embedder_kills = {}, 0
    with Load(url, clients=32, limit_s=300) as load:
        time.sleep(3)
        for deployment in ("Embedder", "Embedder", "Embedder", "Index"):
            if deployment == "Embedder" and ingress_stats()["retried_embed"] > retried["retried_embed"]:
                continue  # a kill caught calls in flight
            replica = busy_embedder() if deployment == "Embedder" else None
            embedder_kills += deployment == "Embedder"
            killed_at = time.monotonic()
            kill_replica(deployment, replica)
            back[deployment] = wait_for(
                lambda d=deployment, t=killed_at: replaced(d, t), 120, f"{deployment}: a replica replaced"
            )
        time.sleep(1)
        load.stop()
    stats = ingress_stats()
    calls = {k: stats[k] - retried[k] for k in ("retried_embed", "retried_search")}
    print(
        f"Serve reported the Embedder replaced {back['Embedder']:.1f} s after its replica's loss, the "
        f"Index {back['Index']:.1f} s after; calls retried by the Ingress {calls} ({embedder_kills} "
        f"Embedder kills); {len(load.records)} requests, {len(load.errors)} errors"
    )
    assert not load.errors, load.errors[:3]
    assert {status for *_, status, _ in load.records} == {200}
    # Embed calls the dead replica had taken were sent again by the Ingress (each would otherwise have
    # been a 500 to its client); the calls not yet taken Serve re-routed by itself.
    assert calls["retried_embed"] > 0


@pytest.fixture(scope="module")
def overload_app(app, world, tmp_path_factory):
    """A second app on the same Serve, at /overload, whose Embedder is the random ~75M Qwen2-VL
    ("small"): its forward pass, not Serve's HTTP path, bounds the throughput, as a model on a GPU does
    behind a proxy with cores to spare. (With the tiny model the proxy and the Ingress are the
    bottleneck on 2 cores, and refusing a request costs about as much as serving it.) The Ingress runs
    16 requests at once and Serve queues 4 more at the proxy; one Embedder replica, given no CPU of
    Ray's so that it is placed whatever the first app's autoscaler holds (Ray then runs it on 1 thread).
    Yields the app's URL."""
    cfg, url = app
    wait_for(lambda: replicas("Embedder") == 1, 60, "the first app's Embedder back at 1 replica")
    heavy = Config()
    heavy.run.output_dir = str(tmp_path_factory.mktemp("serve-overload"))
    heavy.data.image_root = cfg.data.image_root
    model = tmp_path_factory.mktemp("qwen2-vl-small")
    make_tiny(model, "qwen2-vl", size="small")
    heavy.embedder = ModelConfig(path=str(model), image_size=56, max_length=256, batch_size=16)
    build_index(heavy, world / "retrieval" / "captions.jsonl")
    s = heavy.serve
    s.embedder.num_cpus = 0.0
    s.ingress.max_ongoing_requests, s.ingress.max_queued_requests, s.ingress.retry_after_s = 16, 4, 1.0
    serve.run(build_app(heavy), name=OVERLOAD_APP, route_prefix="/overload")
    yield url + "/overload"
    serve.delete(OVERLOAD_APP)


def test_overload_sheds_quickly_and_bounds_the_accepted_p99(overload_app):
    """14 closed-loop clients, 2 fewer than the Ingress runs at once, set the sustainable load R and its
    p99, measured after 3 s of warm-up (a new replica's first batches are slower). The headroom is
    there because a batch's answers come back together, and the clients' next requests can reach the
    proxy before its router has counted the finished ones out: at exactly 16 clients, a fresh-clone run
    shed 18 of 155 requests. Even so a few may be shed (at most 10% allowed).
    Then requests arrive at 2R (Poisson, open loop) for 8 s: past the 16 running and 4 queued, Serve
    answers 503 with Retry-After at once. (At 3R the refusals themselves took a third of the 2 cores:
    the accepted p99 reached 1.98x the sustainable one.)
    Asserted against the same test's sustainable figures: nothing but 200 and 503; the excess shed; a
    503 back in a fraction of a served request's time; the accepted requests' p99 within 2x the
    sustainable p99 (20 requests in the app instead of 14 make ~1.4x if the throughput holds), while the
    app keeps serving at least half of R."""
    url, clients = overload_app, 14
    warm = time.monotonic() + 3
    with Load(url, clients=clients, limit_s=11) as base:
        pass
    rate = base.qps(warm, warm + 8)
    base_ms = 1000 * base.latencies(since=warm)
    start = time.monotonic()
    with Load(url, clients=0, limit_s=8, rate=2 * rate) as over:
        pass
    seconds = time.monotonic() - start
    ok_ms, shed_ms = 1000 * over.latencies(), 1000 * over.latencies(503)
    shed_rate = len(shed_ms) / len(over.records)
    base_p99, ok_p99, shed_p99 = (np.percentile(x, 99) for x in (base_ms, ok_ms, shed_ms))
    base_shed = len(base.latencies(503, since=warm))
    print(
        f"sustainable: {clients} clients, {rate:.1f} QPS, p50 {np.median(base_ms):.0f} ms, "
        f"p99 {base_p99:.0f} ms, {base_shed} shed; 2x ({len(over.records) / 8:.0f}/s offered): "
        f"{shed_rate:.0%} shed, 503 p99 "
        f"{shed_p99:.0f} ms; accepted {len(ok_ms) / seconds:.1f} QPS, p50 {np.median(ok_ms):.0f} ms, p99 "
        f"{ok_p99:.0f} ms"
    )
    assert not (base.errors or over.errors), (base.errors + over.errors)[:3]
    assert base_shed <= 0.1 * len(base_ms)
    assert {status for *_, status, _ in over.records} == {200, 503}
    assert {retry for *_, status, retry in over.records if status == 503} == {"1"}
    assert shed_rate > 0.3
    assert shed_p99 < 0.25 * np.median(base_ms)
    assert ok_p99 < 2 * base_p99
    assert len(ok_ms) / seconds > 0.5 * rate


def raw_search(port: int, payload: bytes, *, send_body: bool = True) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + (payload if send_body else payload[:5]))
    return sock


def established(port: int) -> int:
    return sum(1 for c in psutil.net_connections("tcp") if c.status == "ESTABLISHED" and c.laddr.port == port)


def test_disconnects_and_slow_bodies_cost_nothing_lasting(app):
    cfg, url = app
    port = int(url.rsplit(":", 1)[1])
    payload = json.dumps(body(random.Random(0))).encode()
    with Load(url, clients=4, limit_s=3) as load:
        pass
    base = np.median(load.latencies())
    tasks_before = ingress_stats()["tasks"]
    connections_before = established(port)

    slow_answers: list[tuple[float, bytes]] = []

    def slow_client() -> None:
        """Headers, then the body a byte every 0.3 s (it would take ~40 s), until the server answers."""
        start = time.monotonic()
        sock = raw_search(port, payload, send_body=False)
        sent, answer = 5, b""
        try:
            while time.monotonic() - start < cfg.serve.body_timeout_s + 10:
                if select.select([sock], [], [], 0.3)[0]:
                    answer = sock.recv(4096)
                    break
                if sent < len(payload) - 1:  # never the last byte
                    sock.sendall(payload[sent : sent + 1])
                    sent += 1
        finally:
            sock.close()
        slow_answers.append((time.monotonic() - start, answer))

    def disconnecting_client() -> None:
        for _ in range(5):
            sock = raw_search(port, payload)
            time.sleep(0.02)  # the request is in the app
            sock.close()

    threads = [threading.Thread(target=slow_client) for _ in range(8)]
    threads += [threading.Thread(target=disconnecting_client) for _ in range(8)]
    with Load(url, clients=4, limit_s=3) as during:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    wait_for(lambda: ingress_stats()["in_flight"] == 0, 10, "no request left in the Ingress")
    wait_for(lambda: established(port) <= connections_before, 10, "the proxy's connections back")
    with Load(url, clients=4, limit_s=3) as after:
        pass
    tasks_after = ingress_stats()["tasks"]
    print(
        f"median latency {1000 * base:.0f} ms; with 8 slow bodies and 40 disconnects "
        f"{1000 * np.median(during.latencies()):.0f} ms; after {1000 * np.median(after.latencies()):.0f} ms; "
        f"Ingress tasks {tasks_before} -> {tasks_after}"
    )
    assert not (load.errors or during.errors or after.errors)
    # every slow body got a 408 once serve.body_timeout_s had passed
    assert len(slow_answers) == 8
    for seconds, answer in slow_answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert cfg.serve.body_timeout_s - 0.5 < seconds < cfg.serve.body_timeout_s + 5, seconds
    # the other clients: unaffected while it happened and after
    assert np.median(during.latencies()) < 2 * base + 0.05
    assert np.median(after.latencies()) < 1.5 * base + 0.03
    assert tasks_after <= tasks_before + 2
