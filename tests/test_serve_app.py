"""The Ray Serve app on 127.0.0.1, queried over real HTTP: results equal an in-process Embedder + FAISS
search (and Reranker), every kind of bad input gets its 4xx with a message, and the server keeps
serving afterwards. One app for the whole module, plus a second one without a reranker for the test
that needs it; Serve is shut down at the end (Ray stays up for the session's other tests)."""

import base64
import copy
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import psutil
import pytest
import requests
import yaml
from conftest import free_port
from PIL import Image
from ray import serve
from ray.serve.schema import ServeDeploySchema

from unime_ray.config import Config, ModelConfig
from unime_ray.docsgen import openapi_schema
from unime_ray.models.embedder import Embedder
from unime_ray.models.reranker import Reranker, apply_listwise, fuse
from unime_ray.serve.app import DEPLOYMENT_DEFAULTS, app_builder, build_app, check_port_free
from unime_ray.serve.corpus import read_corpus
from unime_ray.serve.index import IndexMismatchError, build_index

KEY_ENV, KEY = "UNIME_TEST_API_KEY", "test-key-123"
INSTRUCTION = "Find me an everyday image that matches the given caption:"
REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def app(local_ray, tiny_qwen, world, tmp_path_factory):
    cfg = Config()
    cfg.run.output_dir = str(tmp_path_factory.mktemp("serve"))
    cfg.data.image_root = str(world / "images")
    cfg.embedder = ModelConfig(path=str(tiny_qwen), image_size=56, max_length=256, batch_size=16)
    cfg.reranker.model = ModelConfig(path=str(tiny_qwen), dtype="float32", image_size=56, max_length=512)
    s = cfg.serve
    s.api_key_env = KEY_ENV
    s.max_top_k, s.max_text_chars, s.max_embed_inputs = 20, 2000, 4
    s.max_request_bytes, s.max_image_bytes, s.max_image_pixels = 200_000, 60_000, 128 * 128
    s.max_request_pixels = 3 * 100 * 100
    build_index(cfg, world / "retrieval" / "captions.jsonl")

    os.environ[KEY_ENV] = KEY
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="unime-test", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    yield cfg, url
    serve.shutdown()
    del os.environ[KEY_ENV]


@pytest.fixture
def app_without_reranker(app):
    """The module's app again, without a reranker, as a second Serve application on its own route
    prefix (same index, same embedder). Its embedder takes no CPU: the module's app holds both of the
    session Ray's CPUs. Deleted after the test."""
    cfg, url = app
    cfg = copy.deepcopy(cfg)
    cfg.reranker.model = ModelConfig()
    cfg.serve.embedder.num_cpus = 0
    name, prefix = "unime-test-no-reranker", "/no-reranker"
    serve.run(build_app(cfg), name=name, route_prefix=prefix)
    yield cfg, url + prefix
    serve.delete(name)


@pytest.fixture(scope="module")
def direct(app, world):
    """The in-process reference: the same embedder over the same corpus, FAISS exact search."""
    cfg, _ = app
    records = read_corpus(
        world / "retrieval" / "captions.jsonl", world / "images", cfg.index
    ).table.to_pylist()
    embedder = Embedder(cfg.embedder, image_root=world / "images")
    index = faiss.IndexFlatIP(embedder.dim)
    index.add(embedder.embed(records))
    return embedder, index, records


def post(url, path, body, key=KEY, **kwargs):
    headers = {"X-API-Key": key} if key is not None else {}
    return requests.post(url + path, json=body, headers=headers, timeout=60, **kwargs)


def png(path=None, size=(64, 64), color=(200, 30, 30)) -> bytes:
    image = Image.open(path) if path else Image.new("RGB", size, color)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def expected_hits(direct, record, k):
    embedder, index, records = direct
    scores, rows = index.search(embedder.embed([record]), k)
    return [records[r]["id"] for r in rows[0]], scores[0]


def assert_same_ranking(hits, ids, scores):
    np.testing.assert_allclose([h["score"] for h in hits], scores, atol=1e-4)
    assert [h["id"] for h in hits] == ids


def test_serves_on_loopback_only(app):
    _, url = app
    port = int(url.rsplit(":", 1)[1])
    listening = {
        c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port
    }
    assert listening == {"127.0.0.1"}
    health = requests.get(url + "/healthz", headers={"X-API-Key": KEY}, timeout=30).json()
    assert health["status"] == "ok" and health["reranker"] is True
    assert health["index"]["count"] == 96 and health["index"]["dim"] == 64


def test_a_second_server_on_the_port_of_a_running_one_is_refused(app):
    """Serve's proxy listens with SO_REUSEPORT, which would let a second server share its port."""
    _, url = app
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(OSError) as refused:
        check_port_free("127.0.0.1", port)
    assert refused.value.strerror.startswith(f"127.0.0.1:{port} is in use")


def test_answers_only_its_own_host_names(app):
    """A page on another origin that rebinds its name to 127.0.0.1 sends its own name as Host: refused,
    so it cannot read the answers of a server on loopback (TrustedHostMiddleware, serve.allowed_hosts)."""
    _, url = app
    port = url.rsplit(":", 1)[1]
    for host in ("rebind.attacker.example", f"rebind.attacker.example:{port}", "127.0.0.1.nip.io"):
        response = requests.get(url + "/healthz", headers={"Host": host}, timeout=30)
        assert response.status_code == 400, (host, response.status_code, response.text)
        assert "index" not in response.text
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert requests.get(url + "/healthz", headers={"Host": host}, timeout=30).status_code == 200, host


def test_search_equals_direct_search(app, direct, world):
    _, url = app
    image = world / "images" / "eval" / "00003.png"
    cases = [
        (
            {"text": "a red circle on the left", "instruction": INSTRUCTION},
            {"text": f"{INSTRUCTION} a red circle on the left", "image": ""},
        ),
        ({"image": b64(image.read_bytes())}, {"text": "", "image": Image.open(image)}),
        (
            {"image": "data:image/png;base64," + b64(image.read_bytes()), "text": "what is on the left?"},
            {"text": "what is on the left?", "image": Image.open(image)},
        ),
        ({"text": "  a green square  "}, {"text": "a green square", "image": ""}),
    ]
    # Sent at once, so the embedder batches them together with each other.
    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(
            pool.map(lambda c: post(url, "/v1/search", {"query": c[0], "top_k": 7, "rerank": "none"}), cases)
        )
    for (_, record), response in zip(cases, responses):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["rerank"] == {"mode": "none", "candidates": 0, "pick": None}
        assert_same_ranking(body["results"], *expected_hits(direct, record, 7))
        for hit in body["results"]:
            assert set(hit) == {"id", "score", "rerank_score", "source", "text", "image"}
            assert hit["source"] == "captions"


def test_embed_equals_direct_embedding(app, direct, world):
    _, url = app
    embedder = direct[0]
    image = world / "images" / "eval" / "00005.png"
    body = {
        "inputs": [{"text": "two shapes", "instruction": INSTRUCTION}, {"image": b64(image.read_bytes())}]
    }
    response = post(url, "/v1/embed", body)
    assert response.status_code == 200, response.text
    out = response.json()
    want = embedder.embed(
        [{"text": f"{INSTRUCTION} two shapes", "image": ""}, {"text": "", "image": Image.open(image)}]
    )
    assert out["dim"] == 64 and len(out["model"]) == 16
    np.testing.assert_allclose(np.array(out["embeddings"]), want, atol=1e-5)


def test_rerank_equals_direct_reranker(app, direct, world):
    cfg, url = app
    reranker = Reranker(cfg.reranker.model, image_root=world / "images")
    record = {"text": "a blue triangle at the top", "image": ""}
    ids, scores = expected_hits(direct, record, 10)
    by_id = {r["id"]: r for r in direct[2]}
    head = [by_id[i] for i in ids]

    body = post(
        url, "/v1/search", {"query": {"text": record["text"]}, "top_k": 10, "rerank": "pointwise"}
    ).json()
    fused = fuse(reranker.pointwise(record, head), scores, cfg.serve.rerank_alpha)
    order = np.argsort(-fused, kind="stable")
    assert [h["id"] for h in body["results"]] == [ids[i] for i in order]
    np.testing.assert_allclose([h["rerank_score"] for h in body["results"]], fused[order], atol=1e-4)
    assert body["rerank"] == {"mode": "pointwise", "candidates": 10, "pick": None}

    # listwise is the default with a reranker deployed (the paper's pipeline); with top_k below the
    # reranked top-10, the reranker still sees 10 and the answer is cut to top_k
    body = post(url, "/v1/search", {"query": {"text": record["text"]}, "top_k": 3}).json()
    (pick,) = reranker.listwise([record], [head])
    assert body["rerank"] == {"mode": "listwise", "candidates": 10, "pick": pick}
    assert [h["id"] for h in body["results"]] == apply_listwise(ids, pick)[:3]


def test_rerank_without_a_reranker_is_a_400_and_the_server_keeps_serving(app_without_reranker, direct):
    _, url = app_without_reranker
    assert requests.get(url + "/healthz", headers={"X-API-Key": KEY}, timeout=30).json()["reranker"] is False
    query = {"text": "an orange triangle"}
    for mode in ("listwise", "pointwise"):
        response = post(url, "/v1/search", {"query": query, "top_k": 5, "rerank": mode})
        assert response.status_code == 400, (mode, response.status_code, response.text)
        detail = response.json()["detail"]
        assert "has no reranker" in detail and mode in detail and "reranker.model.path" in detail, detail
    # no rerank named: serve.rerank "auto" means none here, and the search is the plain cosine top-k
    response = post(url, "/v1/search", {"query": query, "top_k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rerank"] == {"mode": "none", "candidates": 0, "pick": None}
    assert_same_ranking(body["results"], *expected_hits(direct, {"text": query["text"], "image": ""}, 5))


def bad_requests(cfg):
    """(name, method, path, kwargs, expected status, words expected in the message)."""
    s = cfg.serve
    search = "/v1/search"
    big_png = png(size=(129, 128))  # a few hundred bytes, over the pixel limit
    assert len(big_png) < s.max_image_bytes
    return [
        ("no API key", "post", search, dict(body={"query": {"text": "x"}}, key=None), 401, "X-API-Key"),
        ("wrong API key", "post", search, dict(body={"query": {"text": "x"}}, key="nope"), 401, "X-API-Key"),
        ("empty query", "post", search, dict(body={"query": {}}), 422, "query is empty"),
        (
            "blank text",
            "post",
            search,
            dict(body={"query": {"text": "  ", "instruction": "Find"}}),
            422,
            "empty",
        ),
        ("no query", "post", search, dict(body={"top_k": 3}), 422, "Field required"),
        (
            "bad base64",
            "post",
            search,
            dict(body={"query": {"image": "not*base64"}}),
            422,
            "not valid base64",
        ),
        (
            "a URL",
            "post",
            search,
            dict(body={"query": {"image": "https://example.com/a.png"}}),
            422,
            "does not fetch",
        ),
        (
            "non-image bytes",
            "post",
            search,
            dict(body={"query": {"image": b64(b"hello, world")}}),
            415,
            "(accepted: PNG, JPEG, WEBP, GIF, BMP)",
        ),
        ("truncated PNG", "post", search, dict(body={"query": {"image": b64(png()[:60])}}), 415, "image"),
        (
            "image too many bytes",
            "post",
            search,
            dict(body={"query": {"image": b64(os.urandom(70_000))}}),
            413,
            "over 60000 bytes",
        ),
        (
            "image too many pixels",
            "post",
            search,
            dict(body={"query": {"image": b64(big_png)}}),
            413,
            "129x128",
        ),
        (
            "body too large",
            "post",
            search,
            dict(body={"query": {"text": "x" * 300_000}}),
            413,
            "limit is 200000",
        ),
        (
            "top_k 0",
            "post",
            search,
            dict(body={"query": {"text": "x"}, "top_k": 0}),
            422,
            "greater than or equal to 1",
        ),
        (
            "top_k too big",
            "post",
            search,
            dict(body={"query": {"text": "x"}, "top_k": 21}),
            422,
            "less than or equal to 20",
        ),
        (
            "top_k a string",
            "post",
            search,
            dict(body={"query": {"text": "x"}, "top_k": "5"}),
            422,
            "valid integer",
        ),
        (
            "top_k a bool",
            "post",
            search,
            dict(body={"query": {"text": "x"}, "top_k": True}),
            422,
            "valid integer",
        ),
        (
            "unknown field",
            "post",
            search,
            dict(body={"query": {"text": "x"}, "topk": 3}),
            422,
            "Extra inputs",
        ),
        (
            "unknown query field",
            "post",
            search,
            dict(body={"query": {"text": "x", "url": "u"}}),
            422,
            "Extra inputs",
        ),
        (
            "unknown rerank",
            "post",
            search,
            dict(body={"query": {"text": "x"}, "rerank": "magic"}),
            422,
            "listwise",
        ),
        ("text too long", "post", search, dict(body={"query": {"text": "x" * 2001}}), 422, "at most 2000"),
        ("too many tokens", "post", search, dict(body={"query": {"text": "zq " * 600}}), 422, "limit is 256"),
        (
            "special token",
            "post",
            search,
            dict(body={"query": {"text": "<|image_pad|> a cat"}}),
            422,
            "special token",
        ),
        ("text not a string", "post", search, dict(body={"query": {"text": 5}}), 422, "valid string"),
        (
            "too many inputs",
            "post",
            "/v1/embed",
            dict(body={"inputs": [{"text": "x"}] * 5}),
            422,
            "at most 4",
        ),
        ("no inputs", "post", "/v1/embed", dict(body={"inputs": []}), 422, "at least 1"),
        (
            "request over its pixel budget",
            "post",
            "/v1/embed",
            dict(body={"inputs": [{"image": b64(png(size=(100, 100)))}] * 4}),
            413,
            "hold 40000 pixels; the limit is 30000",
        ),
        (
            "malformed JSON",
            "post",
            search,
            dict(data=b'{"query": ', headers={"X-API-Key": KEY, "content-type": "application/json"}),
            422,
            "JSON",
        ),
        (
            "no Content-Length",
            "post",
            search,
            dict(data=iter([b'{"query": {"text": "x"}}']), headers={"X-API-Key": KEY}),
            411,
            "Content-Length",
        ),
        ("GET a POST route", "get", search, dict(headers={"X-API-Key": KEY}), 405, "Method Not Allowed"),
        (
            "malformed JSON without a key: refused before the body is parsed",
            "post",
            search,
            dict(data=b'{"query": ', headers={"content-type": "application/json"}),
            401,
            "X-API-Key",
        ),
        ("the image route without a key", "get", "/v1/image?id=x", {}, 401, "X-API-Key"),
        (
            "/docs off with a key set (CDN scripts)",
            "get",
            "/docs",
            dict(headers={"X-API-Key": KEY}),
            404,
            "Not Found",
        ),
        ("/redoc off with a key set", "get", "/redoc", dict(headers={"X-API-Key": KEY}), 404, "Not Found"),
    ]


def unservable_inputs():
    """Bodies whose echo FastAPI's default 422 cannot serialize (a 500), or makes huge."""
    json = {"X-API-Key": KEY, "content-type": "application/json"}
    return [
        ("top_k 1e309", dict(data=b'{"query": {"text": "x"}, "top_k": 1e309}', headers=json), "top_k"),
        (
            "a lone surrogate",
            dict(data=b'{"query": {"text": "x"}, "rerank": "\\ud800"}', headers=json),
            "rerank",
        ),
        (
            "a lone surrogate as a field name",
            dict(data=b'{"query": {"text": "x", "\\ud800": 1}}', headers=json),
            "valid string",
        ),
        (
            "a long text",
            dict(json={"query": {"text": "y" * 150_000}}, headers={"X-API-Key": KEY}),
            "at most 2000",
        ),
    ]


def test_validation_errors_never_echo_the_input_nor_fail(app):
    _, url = app
    for name, kwargs, words in unservable_inputs():
        response = requests.post(url + "/v1/search", timeout=60, **kwargs)
        assert response.status_code == 422, (name, response.status_code, response.text[:300])
        assert words in response.text and len(response.content) < 1000, (name, response.text[:300])
        assert '"input"' not in response.text, name


def test_public_routes_say_no_more_than_they_must(app):
    _, url = app
    assert requests.get(url + "/healthz", timeout=30).json() == {"status": "ok"}
    assert requests.get(url + "/openapi.json", timeout=30).status_code == 200
    for page in ("/", "/inspect"):
        response = requests.get(url + page, timeout=30)
        assert response.status_code == 200
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "http" not in csp


def test_bad_inputs_get_their_4xx_and_the_server_keeps_serving(app, direct):
    cfg, url = app
    good = {"query": {"text": "an orange triangle"}, "top_k": 5, "rerank": "none"}
    before = post(url, "/v1/search", good).json()
    for name, method, path, kwargs, status, words in bad_requests(cfg):
        if "body" in kwargs:
            response = post(url, path, kwargs.pop("body"), **kwargs)
        else:
            response = getattr(requests, method)(url + path, timeout=60, **kwargs)
        assert response.status_code == status, (name, response.status_code, response.text)
        assert words in response.text, (name, response.text)
    assert requests.get(url + "/healthz", timeout=30).status_code == 200
    after = post(url, "/v1/search", good).json()
    assert after == before
    assert_same_ranking(
        after["results"], *expected_hits(direct, {"text": "an orange triangle", "image": ""}, 5)
    )


def test_openapi_schema_shows_the_limits(app):
    cfg, url = app
    schema = requests.get(url + "/openapi.json", timeout=30).json()
    # docs/api/openapi.json is built offline by the same code: it must be what a live app serves
    assert schema == openapi_schema(cfg.serve, api_key=True, reranker=True)
    assert {"/v1/search", "/v1/embed", "/healthz"} <= set(schema["paths"])
    search_in = schema["components"]["schemas"]["SearchIn"]
    assert search_in["properties"]["top_k"]["maximum"] == 20 and search_in["additionalProperties"] is False
    assert "APIKeyHeader" in schema["components"]["securitySchemes"]
    assert {"401", "413", "415", "422"} <= set(schema["paths"]["/v1/search"]["post"]["responses"])


def test_app_refuses_an_index_of_another_embedder(app):
    cfg, _ = app
    other = replace(cfg, embedder=ModelConfig(path=cfg.embedder.path, image_size=28, max_length=256))
    with pytest.raises(IndexMismatchError, match="image_size 56 .index. vs 28 .config."):
        build_app(other)


def test_serve_config_file_matches_the_app(app, tmp_path):
    cfg, _ = app
    config = ServeDeploySchema.model_validate(
        yaml.safe_load((REPO / "jobs" / "configs" / "serve.yaml").read_text())
    )
    assert config.http_options.host == "127.0.0.1"
    (application,) = config.applications
    assert application.import_path == "unime_ray.serve.app:app_builder"
    assert {d.name for d in application.deployments} <= set(DEPLOYMENT_DEFAULTS)
    assert (REPO / application.args["config"]).is_file()
    # the builder with the file's args shape, pointed at this module's index
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(
        yaml.safe_dump({"embedder": {"path": cfg.embedder.path, "image_size": 56, "max_length": 256}})
    )
    overrides = [f"run.output_dir={cfg.run.output_dir}", f"serve.api_key_env={KEY_ENV}"]
    assert app_builder({"config": str(config_file), "overrides": overrides}) is not None
    with pytest.raises(ValueError, match="unknown app args"):
        app_builder({"config": str(config_file), "port": 1})
