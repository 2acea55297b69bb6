"""The Ray Serve application: embed the query, search the corpus index, optionally rerank (the paper's
inference pipeline: cosine top-10, then the listwise reranker), over HTTP.

    unime-ray serve --run runs/tiny                       # after `unime-ray demo`: its index and models
    serve deploy jobs/configs/serve.yaml                  # the same app from a Serve config file
    curl -s 127.0.0.1:8000/v1/search -H 'content-type: application/json' \\
        -d '{"query": {"text": "a red circle on the left"}, "top_k": 5}'

Deployments, composed with handles (the Ingress holds the other three):
  Ingress   FastAPI: validates every input, then Embedder -> Index -> Reranker (when asked)
  Embedder  the UniME-V2 embedder; `@serve.batch` turns concurrent requests into one forward pass
  Index     the corpus index (`unime_ray.serve.index`), loaded once per replica; refuses an index built
            with another embedder
  Reranker  listwise over the embedding top-`serve.rerank_top` (10, as in the paper), or pointwise
            (Yes-probability fused with the cosine); deployed when `reranker.model.path` is set
Endpoints: POST /v1/search, POST /v1/embed, GET /v1/image (a result's image, by record id), GET /healthz,
and FastAPI's /openapi.json and /docs. Pages for people: GET / is a search page (`serve/pages/search.html`:
a text box, an image upload, top-k thumbnails, the rerank switch) over /v1/search and /v1/image; GET
/inspect shows the mining inspector's page of `serve.inspect_run` (`unime_ray.inspector`), fetched
from /inspect/report. The pages are static and hold no data: with an API key set, everything they
fetch needs the key, which the user types into the page.

A query is `{text?, image?, instruction?}`; the text embedded is `instruction + " " + text` (MMEB puts
the task instruction in front of the query), with the image, if any, in front as the backbone's image
placeholder. Images travel in the JSON body as base64 bytes (a `data:...;base64,` prefix is accepted);
the server never fetches a URL. Bad input is a 4xx with a message in `detail`, never a 5xx, and is
caught at the Ingress, so nothing unchecked reaches a model (where one bad input would fail the
whole batch it shares with other requests). The status codes and their causes are `_ERRORS`, which
/openapi.json (and docs/api.md) shows.
Faults: a call to the Embedder or Index (each idempotent) that a dying replica had taken is sent once
more (`Ingress.call`); Serve re-routes the rest and replaces the replica (docs/serving.md).
"""

import argparse
import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import ipaddress
import os
import signal
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Security
from fastapi import Query as QueryParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.middleware.trustedhost import TrustedHostMiddleware

from unime_ray.config import (
    Config,
    DeploymentConfig,
    IndexConfig,
    ModelConfig,
    ServeConfig,
    add_config_args,
    config_from_args,
    config_from_dict,
    load_config,
    model_dict,
)
from unime_ray.data.images import IMAGE_FORMATS, open_image, thumbnail
from unime_ray.serve.index import CorpusIndex, index_dir, model_identity, read_meta

RerankMode = Literal["none", "listwise", "pointwise"]
IMAGE_SIDE = 256  # /v1/image answers a PNG thumbnail at most this many pixels a side
PAGES = Path(__file__).with_name("pages")
Query = tuple[str, bytes | None]  # (text to embed, image bytes) as it travels between deployments
API_KEY_HEADER = "X-API-Key"
# Per deployment: CPUs per replica, max_ongoing_requests and max_queued_requests when the config leaves
# them null. The Ingress and Index mostly wait or do sub-millisecond work; the models want a core each.
# The Ingress must admit many requests at once, or the Embedder never sees enough of them to form a
# batch. The models' queues are bounded: past them a request gets a quick 503 (Serve's backpressure)
# instead of waiting behind work the server cannot finish in time; -1 = unbounded.
DEPLOYMENT_DEFAULTS = {
    "Ingress": (0.0, 256, 128),
    "Embedder": (1.0, 64, 64),
    "Index": (0.0, 64, -1),
    "Reranker": (1.0, 8, 16),
}


LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1"]


def is_loopback(host: str) -> bool:
    """Whether an HTTP bind address is reachable from this machine only ("localhost" or a loopback IP).
    Any other name counts as reachable from elsewhere: it is not resolved here."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(cfg: ServeConfig) -> list[str]:
    """The Host header names the app answers: `serve.allowed_hosts`, or by default the loopback names
    for a loopback server (a web page cannot rebind its own name to 127.0.0.1 and read the answers),
    the bind address itself plus loopback for a server on one address, and any name for a server on
    every interface (0.0.0.0, ::), whose names only its operator knows: set them there."""
    if cfg.allowed_hosts:
        return list(cfg.allowed_hosts)
    if is_loopback(cfg.host):
        return LOOPBACK_NAMES
    if cfg.host in ("0.0.0.0", "::", ""):
        return ["*"]
    return [cfg.host, *LOOPBACK_NAMES]


def check_exposure(cfg: ServeConfig) -> None:
    """Refuse (ValueError) a server without an API key on an address other machines reach, unless
    `serve.allow_public_without_key` says that is meant."""
    if is_loopback(cfg.host) or cfg.api_key_env or cfg.allow_public_without_key:
        return
    raise ValueError(
        f"serve.host is {cfg.host!r}, reachable from other machines, and no API key is set: name the "
        "variable holding one in serve.api_key_env, or set serve.allow_public_without_key=true to serve "
        "everyone without a key"
    )


def check_port_free(host: str, port: int) -> None:
    """Refuse (OSError) a `host:port` where something already listens. Serve's HTTP proxy binds with
    SO_REUSEPORT, so a second server on a busy port would start without an error and the kernel would
    share the connections between the two (a keyless one would answer half the requests meant for a
    keyed one). The probe binds every address `host` resolves to without SO_REUSEPORT, which fails
    while any socket listens there; with SO_REUSEADDR, as the proxy sets, so the closed connections of
    a server just stopped (TIME_WAIT) do not count. A check, not a lock: a server starting in between
    is not seen."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(e.errno, f"serve.host {host!r} does not resolve here ({e.strerror})") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                raise OSError(
                    e.errno,
                    f"{host}:{port} is in use ({e.strerror}): another server listens there; stop it, or "
                    "choose a free port with --set serve.port=N",
                ) from None


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Image bytes -> RGB image, fully decoded. Raises HTTPException 413 over `max_pixels`, 415 when the
    bytes are not a PNG, JPEG, WebP, GIF or BMP that decodes (checked before a model sees them; no other
    format is tried, so an EPS never reaches Ghostscript)."""
    try:
        image = open_image(io.BytesIO(data))
        too_big = max_pixels is not None and image.width * image.height > max_pixels
        if not too_big:
            image.load()
            image = image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise HTTPException(413, f"query.image: {error}") from None
    except UnidentifiedImageError:
        raise HTTPException(
            415,
            f"query.image: no image format recognised in these bytes (accepted: {', '.join(IMAGE_FORMATS)})",
        ) from None
    except Exception:  # decoders raise many types on bad client bytes; all mean "not an image"
        # Without the decoder's message: it may name files or programs of this machine.
        raise HTTPException(415, "query.image is not a readable image (truncated or corrupt)") from None
    if too_big:
        raise HTTPException(
            413, f"query.image is {image.width}x{image.height} pixels; the limit is {max_pixels}"
        )
    return image


def image_pixels(data: bytes) -> int:
    """Width x height from the image header, without decoding the pixels; 0 for bytes that are not an
    image (decode_image says so later, with its 415)."""
    try:
        with open_image(io.BytesIO(data)) as image:
            return image.width * image.height
    except Exception:
        return 0


def model_image(data: bytes, max_pixels: int, side: int) -> bytes:
    """Checked query image bytes -> a side x side PNG, resized right after decoding as the models resize
    (RGB, bicubic, to the square input size), so the full-size pixels live only inside this call. The
    models' own resize of a side x side image to side x side changes nothing. Runs in a worker thread."""
    image = decode_image(data, max_pixels).resize((side, side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def request_models(cfg: ServeConfig) -> tuple[type[BaseModel], type[BaseModel]]:
    """The request bodies, with this server's limits in their schema (so /openapi.json shows them)."""

    class QueryIn(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        text: str | None = Field(None, max_length=cfg.max_text_chars, description="query text")
        image: str | None = Field(
            None, description="image bytes, base64 (optionally as a data: URL); never a URL to fetch"
        )
        instruction: str | None = Field(
            None, max_length=cfg.max_text_chars, description="task instruction, put in front of the text"
        )

        @model_validator(mode="after")
        def not_empty(self) -> Self:
            if not (self.text or "").strip() and not self.image:
                raise ValueError("the query is empty: give a text, an image, or both")
            return self

    class SearchIn(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        query: QueryIn
        top_k: int = Field(cfg.default_top_k, ge=1, le=cfg.max_top_k, description="results to return")
        rerank: RerankMode = Field(cfg.rerank, description=f"reranking of the top {cfg.rerank_top}")

    class EmbedIn(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        inputs: list[QueryIn] = Field(min_length=1, max_length=cfg.max_embed_inputs)

    return SearchIn, EmbedIn


class Hit(BaseModel):
    id: str
    score: float = Field(description="cosine similarity of query and record embeddings")
    rerank_score: float | None = Field(None, description="pointwise rerank: fused score the order follows")
    source: str = Field(description="corpus file the record came from")
    text: str = Field(description="the record's text as embedded")
    image: str = Field(description="the record's image path, relative to the corpus image root; '' = none")


class RerankOut(BaseModel):
    mode: RerankMode
    candidates: int = Field(0, description="embedding top-K handed to the reranker")
    pick: int | None = Field(None, description="listwise: 0-based position picked (null: no valid answer)")


class SearchOut(BaseModel):
    results: list[Hit]
    rerank: RerankOut


class EmbedOut(BaseModel):
    model: str = Field(description="embedder weights digest (as recorded in the index)")
    dim: int
    embeddings: list[list[float]]


@serve.deployment(name="Embedder")
class EmbedderDeployment:
    def __init__(self, model: dict[str, Any], batching: bool, max_batch_size: int, batch_wait_s: float):
        from unime_ray.models.embedder import Embedder

        self.embedder = Embedder(config_from_dict(ModelConfig, model))
        # Batching off = batches of one, through the same code path, so on/off compare like for like.
        self.embed_batch.set_max_batch_size(max_batch_size if batching else 1)
        self.max_wait = batch_wait_s if batching else 0.0
        self.embed_batch.set_batch_wait_timeout_s(0.0)
        self.counts = {"batches": 0, "inputs": 0, "ongoing": 0}

    async def embed(self, query: Query) -> np.ndarray:
        """The embedding of one query; concurrent calls share forward passes (`embed_batch`)."""
        self.counts["ongoing"] += 1
        try:
            return await self.embed_batch(query)
        finally:
            self.counts["ongoing"] -= 1

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def embed_batch(self, queries: list[Query]) -> list[np.ndarray]:
        self.counts["batches"] += 1
        self.counts["inputs"] += len(queries)
        records = [{"text": text, "image": decode_image(image) if image else ""} for text, image in queries]
        start = time.perf_counter()
        # In a thread: the event loop keeps collecting the next batch while this one runs.
        vectors = await asyncio.to_thread(self.embedder.embed, records)
        # Serve forms the next batch while this one runs, closing it `wait` seconds after its first
        # request. A fixed short wait under load closes many near-empty batches that then queue up, a
        # long one delays a lone request. Waiting about as long as a forward pass takes adapts to both:
        # milliseconds for a light model or a quiet server, up to `batch_wait_s` under load.
        self.embed_batch.set_batch_wait_timeout_s(min(self.max_wait, time.perf_counter() - start))
        return list(vectors)

    async def stats(self) -> dict[str, Any]:
        """Batches run and inputs embedded since the replica started (inputs / batches = mean batch),
        embed calls in the replica now, and which replica answered (Serve's replica id)."""
        return {**self.counts, "replica": serve.get_replica_context().replica_id.unique_id}


@serve.deployment(name="Index")
class IndexDeployment:
    def __init__(self, directory: str, model: dict[str, Any], cfg: dict[str, Any]):
        self.index = CorpusIndex.load(directory, model, config_from_dict(IndexConfig, cfg))

    # async, run on the replica's event loop: a FAISS search of a query is far cheaper than the hop to
    # Serve's thread pool that a sync method would take.
    async def search(self, vector: np.ndarray, k: int) -> list[dict[str, Any]]:
        scores, rows = self.index.search(vector[None, :], k)
        found = rows[0] >= 0
        hits = self.index.records(rows[0][found])
        for hit, score in zip(hits, scores[0][found], strict=True):
            hit["score"] = float(score)
        return hits

    async def image(self, record_id: str) -> bytes | None:
        """Record `record_id`'s image as a PNG thumbnail; None for an unknown id, a record without an
        image, or an image file that is gone or unreadable."""
        path = self.index.image_file(record_id)
        return None if path is None else await asyncio.to_thread(thumbnail, path, IMAGE_SIDE, "PNG")

    async def info(self) -> dict[str, Any]:
        meta = self.index.meta
        return {
            "count": len(self.index),
            "dim": meta["dim"],
            "type": meta["type"],
            "updated": meta["updated"],
        }


@serve.deployment(name="Reranker")
class RerankerDeployment:
    def __init__(self, model: dict[str, Any], image_root: str, alpha: float):
        from unime_ray.models.reranker import Reranker

        self.reranker = Reranker(config_from_dict(ModelConfig, model), image_root)
        self.alpha = alpha

    async def rerank(self, mode: RerankMode, query: Query, cands: list[dict[str, Any]]) -> dict[str, Any]:
        """New order of `cands` (positions), pointwise scores, and the listwise pick."""
        return await asyncio.to_thread(self._rerank, mode, query, cands)

    def _rerank(self, mode: RerankMode, query: Query, cands: list[dict[str, Any]]) -> dict[str, Any]:
        from unime_ray.models.reranker import apply_listwise, fuse

        text, image = query
        record = {"text": text, "image": decode_image(image) if image else ""}
        if mode == "listwise":
            (pick,) = self.reranker.listwise([record], [cands])
            return {"order": apply_listwise(range(len(cands)), pick), "scores": None, "pick": pick}
        fused = fuse(
            self.reranker.pointwise(record, cands), np.array([c["score"] for c in cands]), self.alpha
        )
        return {"order": np.argsort(-fused, kind="stable").tolist(), "scores": fused.tolist(), "pick": None}


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(
        self,
        embedder: DeploymentHandle,
        index: DeploymentHandle,
        reranker: DeploymentHandle | None,
        settings: dict[str, Any],
        key_digest: str,
        model: dict[str, Any],
        inspect: dict[str, str] | None = None,
    ):
        from transformers import AutoTokenizer

        self.embedder, self.index, self.reranker = embedder, index, reranker
        self.cfg = config_from_dict(ServeConfig, settings)
        self.key_digest = key_digest
        self.model = model
        # The inspector page is built on its first request, not here: a replica starts as fast with a
        # mining run as without, and a server nobody inspects never reads the run.
        self.inspect = inspect
        self.inspect_page: str | None = None
        self.inspect_lock = asyncio.Lock()
        tokenizers = [AutoTokenizer.from_pretrained(model["path"], local_files_only=True)]
        if model["reranker_path"]:
            tokenizers.append(AutoTokenizer.from_pretrained(model["reranker_path"], local_files_only=True))
        self.tokenizer = tokenizers[0]
        # Text that spells a special token (an image pad, a chat turn marker) would be read as that
        # token: a text-only query claiming an image fails the forward pass of its whole batch.
        self.special = sorted({t.content for tok in tokenizers for t in tok.added_tokens_decoder.values()})
        # HTTP requests in this replica now (BodyLimit counts them), calls retried after a replica death
        self.counts = {"in_flight": 0, "retried_embed": 0, "retried_search": 0}

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self)

    async def call(self, handle: DeploymentHandle, method: str, *args: Any) -> Any:
        """`handle.<method>.remote(*args)`, for methods whose calls are idempotent (embed, search, info,
        stats), sent once more if the replica that took it died before answering.

        Serve re-routes by itself a call whose replica dies before accepting it, and from then on routes
        around the dead replica (and starts another); a call the replica had already accepted fails
        with the actor's death. Sent again, it goes to a live replica, or waits in the handle's queue
        until Serve has replaced the dead one."""
        try:
            return await getattr(handle, method).remote(*args)
        except RayActorError:  # ActorDiedError; ActorUnavailableError: unreachable, maybe alive
            key = f"retried_{method}"
            self.counts[key] = self.counts.get(key, 0) + 1
            return await getattr(handle, method).remote(*args)

    async def stats(self) -> dict[str, Any]:
        """This replica's counts: HTTP requests in flight, calls retried after a replica death (by
        method), and tasks on its event loop (requests, Serve's own)."""
        return {**self.counts, "tasks": len(asyncio.all_tasks())}

    async def queries(self, qs: list[BaseModel]) -> list[Query]:
        """Validated queries as they go to the models: (instruction + text, image bytes or None). The
        images' pixels are counted from their headers against serve.max_request_pixels before any is
        decoded; each is then decoded and downscaled to the models' input size in a worker thread
        (`model_image`), off the event loop that answers the other requests."""
        texts = [self.text(q) for q in qs]
        raws = [self.image_bytes(q.image) if q.image else None for q in qs]
        pixels = sum(await asyncio.to_thread(lambda: [image_pixels(r) for r in raws if r]))
        if pixels > self.cfg.max_request_pixels:
            raise HTTPException(
                413, f"the request's images hold {pixels} pixels; the limit is {self.cfg.max_request_pixels}"
            )
        side, limit = self.model["image_side"], self.cfg.max_image_pixels
        images = await asyncio.gather(
            *(asyncio.to_thread(model_image, raw, limit, side) for raw in raws if raw is not None)
        )
        given = iter(images)
        return [(text, None if raw is None else next(given)) for text, raw in zip(texts, raws, strict=True)]

    def text(self, q: BaseModel) -> str:
        """instruction + text of a query, checked against the special tokens and the token limit."""
        text = " ".join(part for part in ((q.instruction or "").strip(), (q.text or "").strip()) if part)
        for token in self.special:
            if token in text:
                raise HTTPException(422, f"query text contains the model's special token {token!r}")
        tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokens > self.model["max_length"]:
            raise HTTPException(
                422, f"query text is {tokens} tokens; the embedder's limit is {self.model['max_length']}"
            )
        return text

    def image_bytes(self, data: str) -> bytes:
        """The bytes of a base64 (or base64 data: URL) image, at most serve.max_image_bytes; not decoded."""
        if "://" in data[:16]:
            raise HTTPException(422, "query.image must be base64 image bytes; the server does not fetch URLs")
        if data.startswith("data:"):
            header, _, data = data.partition(",")
            if not header.endswith(";base64"):
                raise HTTPException(422, "query.image: a data URL must be base64 (data:<type>;base64,...)")
        data = "".join(data.split())  # MIME-style line breaks
        limit = self.cfg.max_image_bytes
        if len(data) > 4 * ((limit + 2) // 3):
            raise HTTPException(413, f"query.image is over {limit} bytes")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as error:
            raise HTTPException(422, f"query.image is not valid base64 ({error})") from None
        if len(raw) > limit:
            raise HTTPException(413, f"query.image is {len(raw)} bytes; the limit is {limit}")
        return raw

    async def search(self, req: Any) -> SearchOut:
        if req.rerank != "none" and self.reranker is None:
            raise HTTPException(
                400, f"rerank={req.rerank!r}: this server has no reranker (reranker.model.path)"
            )
        (query,) = await self.queries([req.query])
        vector = await self.call(self.embedder, "embed", query)
        reranking = req.rerank != "none"
        k = max(req.top_k, self.cfg.rerank_top if reranking else 0)
        hits = await self.call(self.index, "search", vector, k)
        rerank = RerankOut(mode=req.rerank)
        if reranking and hits:
            head = hits[: self.cfg.rerank_top]
            out = await self.reranker.rerank.remote(req.rerank, query, head)
            if out["scores"] is not None:  # pointwise
                for hit, score in zip(head, out["scores"], strict=True):
                    hit["rerank_score"] = score
            hits = [head[i] for i in out["order"]] + hits[len(head) :]
            rerank = RerankOut(mode=req.rerank, candidates=len(head), pick=out["pick"])
        return SearchOut(results=[Hit(**h) for h in hits[: req.top_k]], rerank=rerank)

    async def embed(self, req: Any) -> EmbedOut:
        queries = await self.queries(req.inputs)
        vectors = await asyncio.gather(*(self.call(self.embedder, "embed", q) for q in queries))
        return EmbedOut(
            model=self.model["weights"], dim=self.model["dim"], embeddings=[v.tolist() for v in vectors]
        )

    async def image(self, record_id: str) -> bytes:
        png = await self.index.image.remote(record_id)
        if png is None:
            raise HTTPException(404, f"no image for id {record_id!r} (unknown id, or a record without one)")
        return png

    async def inspect_report(self) -> str:
        if self.inspect is None:
            raise HTTPException(404, "this server was started without a mining run (serve.inspect_run)")
        from unime_ray.inspector import build_report

        async with self.inspect_lock:  # concurrent first requests build it once
            if self.inspect_page is None:
                try:
                    self.inspect_page = await asyncio.to_thread(
                        build_report, self.inspect["run"], self.inspect["image_root"]
                    )
                except (OSError, ValueError):  # the run changed or vanished since the start
                    # Without the error's text: it names files of this machine (the server's log has it).
                    raise HTTPException(503, "the mining run could not be read (see the log)") from None
        return self.inspect_page

    async def health(self) -> dict[str, Any]:
        index, embedder = await asyncio.gather(
            self.call(self.index, "info"), self.call(self.embedder, "stats")
        )
        return {"status": "ok", "index": index, "embedder": embedder, "reranker": self.reranker is not None}


class BodyLimit:
    """ASGI middleware: a POST must declare its size (Content-Length), at most `limit` bytes, so an
    oversized body is refused before it is read; its body must then arrive within `timeout` seconds, or
    the request ends with a 408, so a client that trickles its body (or stops sending it) holds a request
    slot of the Ingress that long at most. Counts the HTTP requests in the replica in
    `counts["in_flight"]`. Plain ASGI rather than `@app.middleware`, which costs a task and a copy per
    request."""

    def __init__(self, app: Any, limit: int, timeout: float, counts: dict[str, int]):
        self.app, self.limit, self.timeout, self.counts = app, limit, timeout, counts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST":
            length = dict(scope["headers"]).get(b"content-length", b"")
            refusal = None
            if not length.isdigit():
                refusal = JSONResponse({"detail": "a POST needs a Content-Length header"}, status_code=411)
            elif int(length) > self.limit:
                detail = f"request body is {int(length)} bytes; the limit is {self.limit}"
                refusal = JSONResponse({"detail": detail}, status_code=413)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
            receive = self.body_in_time(receive)
        self.counts["in_flight"] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.counts["in_flight"] -= 1

    def body_in_time(self, receive: Any) -> Any:
        """`receive`, raising HTTPException 408 (FastAPI answers it) when the body is not complete
        `timeout` seconds from now."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        complete = False

        async def receive_in_time() -> dict:
            nonlocal complete
            if complete:  # after the body: a wait for the disconnect, not bounded here
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"request body not received within {self.timeout:g} s") from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return receive_in_time


# Routes answered without the API key when one is set: the two static pages (they hold no data and ask
# the user for the key), the OpenAPI schema (field names and limits, no data) and /healthz, which then
# says only {"status": "ok"} (its counts and replica ids need the key).
PUBLIC_PATHS = frozenset({"/", "/inspect", "/openapi.json", "/healthz"})
# The pages run their own inline script and load nothing from elsewhere.
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


class KeyGate:
    """ASGI middleware: with an API key set, every route but PUBLIC_PATHS needs it in X-API-Key, checked
    from the headers before the body is read or parsed (a keyless malformed body gets 401, not 422)."""

    def __init__(self, app: Any, key_digest: str):
        self.app, self.key_digest = app, key_digest

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            key = dict(scope["headers"]).get(API_KEY_HEADER.lower().encode())
            if not key_matches(key, self.key_digest):
                detail = f"missing or wrong {API_KEY_HEADER} header"
                await JSONResponse({"detail": detail}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def key_matches(key: bytes | str | None, digest: str) -> bool:
    """Constant-time comparison of a presented key with the digest of the configured one."""
    if key is None:
        return False
    raw = key if isinstance(key, bytes) else key.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(hashlib.sha256(raw).hexdigest(), digest)


async def validation_error(request: Any, error: RequestValidationError) -> JSONResponse:
    """422 with where and what for each problem, never the offending input: FastAPI's default echoes it,
    which makes a 7 MB text a 7 MB answer and fails (500) on values JSON cannot carry back (1e309 parsed
    as infinity, a lone surrogate)."""

    def clean(part: Any) -> Any:
        return part if isinstance(part, int) else str(part).encode("utf-8", "replace").decode()[:100]

    detail = [
        {"loc": [clean(p) for p in e.get("loc", ())], "msg": clean(e.get("msg", "")), "type": e.get("type")}
        for e in error.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def _gated_api(service: Ingress) -> FastAPI:
    """An app with no routes yet, behind the host check, the body-size gate and (with a key) the key gate."""
    cfg = service.cfg
    keyed = bool(service.key_digest)
    api = FastAPI(
        title="unime_ray",
        version="1",
        description="UniME-V2 retrieval: embed, search a FAISS index, rerank. Errors are 4xx with `detail`.",
        # FastAPI's /docs and /redoc load their scripts from a CDN, on the origin whose page keeps the
        # key: off when a key is set (the schema stays at /openapi.json; docs/api.md has it rendered).
        docs_url=None if keyed else "/docs",
        redoc_url=None if keyed else "/redoc",
        exception_handlers={RequestValidationError: validation_error},
    )

    api.add_middleware(
        BodyLimit, limit=cfg.max_request_bytes, timeout=cfg.body_timeout_s, counts=service.counts
    )
    if keyed:
        api.add_middleware(KeyGate, key_digest=service.key_digest)
    # Added last, so it runs first: a request for a name this server does not answer gets 400 at once.
    api.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(cfg))
    return api


def _add_pages(api: FastAPI, service: Ingress, guard: list) -> None:
    """The pages for people: search and inspect (public: static HTML), the inspect report (keyed)."""
    pages = {name: (PAGES / name).read_text(encoding="utf-8") for name in ("search.html", "inspect.html")}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def search_page() -> HTMLResponse:
        return HTMLResponse(pages["search.html"], headers={"Content-Security-Policy": PAGE_CSP})

    @api.get("/inspect", response_class=HTMLResponse, include_in_schema=False)
    async def inspect_page() -> HTMLResponse:
        return HTMLResponse(pages["inspect.html"], headers={"Content-Security-Policy": PAGE_CSP})

    @api.get("/inspect/report", response_class=HTMLResponse, dependencies=guard, include_in_schema=False)
    async def inspect_report() -> HTMLResponse:
        return HTMLResponse(await service.inspect_report())


def make_api(service: Ingress) -> FastAPI:
    """The HTTP surface of `service`: routes, the body-size gate and the API key check."""
    SearchIn, EmbedIn = request_models(service.cfg)
    keyed = bool(service.key_digest)
    api = _gated_api(service)
    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)

    async def require_key(key: str | None = Security(key_header)) -> None:
        # KeyGate refused a wrong key already; this dependency puts the scheme into /openapi.json.
        if not key_matches(key, service.key_digest):
            raise HTTPException(401, f"missing or wrong {API_KEY_HEADER} header")

    guard = [Depends(require_key)] if service.key_digest else []
    _add_pages(api, service, guard)
    errors = {code: {"description": text} for code, text in _ERRORS.items()}

    @api.post("/v1/search", dependencies=guard, responses=errors)
    async def search(req: SearchIn) -> SearchOut:
        """Embed the query, return the top_k records by cosine, reranked if asked."""
        return await service.search(req)

    @api.post("/v1/embed", dependencies=guard, responses=errors)
    async def embed(req: EmbedIn) -> EmbedOut:
        """Embedding vectors (unit length) of up to serve.max_embed_inputs queries."""
        return await service.embed(req)

    @api.get(
        "/v1/image",
        dependencies=guard,
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "the image as PNG"},
            401: errors[401],
            404: {"description": "unknown id, or a record without an image"},
        },
    )
    async def image(
        record_id: str = QueryParam(alias="id", max_length=1000, description="a search result's `id`"),
    ) -> Response:
        """The image of search result `id` (a record id of the index), as a PNG at most 256 pixels a side.
        The file is looked up in the index's own records; no path is taken from the request."""
        return Response(await service.image(record_id), media_type="image/png")

    @api.get("/healthz")
    async def healthz(key: str | None = Security(key_header)) -> dict[str, Any]:
        """Liveness: the index and embedder replicas answer. With the key (or on a server without one):
        index size, dimension and type, batches run by the embedder replica that answered."""
        health = await service.health()
        if keyed and not key_matches(key, service.key_digest):
            return {"status": health["status"]}
        return health

    return api


_ERRORS = {
    400: "a rerank mode asked of a server without a reranker; a Host header this server does not answer "
    "(serve.allowed_hosts)",
    401: "missing or wrong API key (X-API-Key, when serve.api_key_env names a key)",
    408: "request body not complete serve.body_timeout_s after its headers (a slow or stalled client)",
    411: "no Content-Length (the body size is checked before the body is read)",
    413: "body over serve.max_request_bytes; an image over serve.max_image_bytes or serve.max_image_pixels; "
    "the images of one request over serve.max_request_pixels together",
    415: "image bytes that are not a PNG, JPEG, WebP, GIF or BMP that decodes (no other format is tried)",
    422: "invalid request (see detail): malformed JSON, unknown fields, wrong types, an empty query "
    "(no text, no image), invalid base64 or a URL, a text over serve.max_text_chars or the embedder's "
    "token limit, the model's special tokens in a text, top_k outside 1..serve.max_top_k, an unknown "
    "rerank mode",
    503: "overloaded: a model's queue is full (serve.<deployment>.max_queued_requests); plain text from "
    "Serve, with a Retry-After header, at once rather than queueing work the server cannot keep up with",
}


def _deploy_options(name: str, d: DeploymentConfig) -> dict[str, Any]:
    cpus, ongoing, queued = DEPLOYMENT_DEFAULTS[name]
    if d.max_replicas < d.min_replicas:
        raise ValueError(f"serve: {name} max_replicas {d.max_replicas} < min_replicas {d.min_replicas}")
    replicas: dict[str, Any] = {"num_replicas": d.min_replicas}
    if d.max_replicas > d.min_replicas:
        # Serve's own autoscaler; the settings left null keep Serve's defaults.
        optional = {
            "upscale_delay_s": d.upscale_delay_s,
            "downscale_delay_s": d.downscale_delay_s,
            "look_back_period_s": d.look_back_period_s,
            "metrics_interval_s": d.metrics_interval_s,
        }
        replicas = {
            "autoscaling_config": {
                "min_replicas": d.min_replicas,
                "max_replicas": d.max_replicas,
                "target_ongoing_requests": d.target_ongoing_requests,
                **{key: value for key, value in optional.items() if value is not None},
            }
        }
    return {
        **replicas,
        "health_check_period_s": d.health_check_period_s,
        # One access-log line per HTTP request (the Ingress's), not one more per internal call.
        "logging_config": {"enable_access_log": name == "Ingress"},
        "max_ongoing_requests": d.max_ongoing_requests or ongoing,
        # Past the queue, Serve answers 503 + Retry-After (raised in the Ingress as BackPressureError,
        # which Serve's own exception handler turns into that response).
        "max_queued_requests": queued if d.max_queued_requests is None else d.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": d.retry_after_s},
        "ray_actor_options": {"num_cpus": cpus if d.num_cpus is None else d.num_cpus, "num_gpus": d.num_gpus},
    }


def build_app(cfg: Config) -> Application:
    """The Serve application for `cfg`: the embedder `cfg.embedder`, the index at `index.dir`, the
    reranker `cfg.reranker.model` (if its path is set). Raises here, before anything is deployed, when
    the index is missing or was built with another embedder, when the API key variable is unset, or
    when `serve.host` is not loopback and no key is set (`check_exposure`)."""
    s = cfg.serve
    check_exposure(s)
    directory = index_dir(cfg)
    model = model_identity(cfg.embedder)
    meta = read_meta(directory, model)
    key_digest = ""
    if s.api_key_env:
        key = os.environ.get(s.api_key_env, "")
        if not key:
            raise ValueError(f"serve.api_key_env names ${s.api_key_env}, which is unset or empty")
        key_digest = hashlib.sha256(key.encode()).hexdigest()  # the key itself never leaves this process

    def deployment(d: Any, name: str, settings: DeploymentConfig) -> Any:
        return d.options(**_deploy_options(name, settings))

    embedder = deployment(EmbedderDeployment, "Embedder", s.embedder).bind(
        model_dict(cfg.embedder), s.batching, s.max_batch_size, s.batch_wait_s
    )
    index = deployment(IndexDeployment, "Index", s.index).bind(
        str(directory.resolve()), model, asdict(cfg.index)
    )
    reranker = None
    if cfg.reranker.model.path:
        reranker = deployment(RerankerDeployment, "Reranker", s.reranker).bind(
            asdict(cfg.reranker.model), meta["image_root"], s.rerank_alpha
        )
    settings = asdict(s)
    if s.rerank == "auto":
        settings["rerank"] = "listwise" if reranker is not None else "none"
    # Query images are downscaled at the Ingress to the largest input size of the models that read them.
    side = max(cfg.embedder.image_size, cfg.reranker.model.image_size if reranker is not None else 0)
    public = {**model, "reranker_path": cfg.reranker.model.path, "image_side": side}
    inspect = None
    if s.inspect_run:
        from unime_ray.inspector import mining_dir

        mining_dir(s.inspect_run)  # a wrong path fails here, before anything is deployed
        inspect = {
            "run": str(Path(s.inspect_run).resolve()),
            "image_root": str(Path(cfg.data.image_root).resolve()),
        }
    return deployment(Ingress, "Ingress", s.ingress).bind(
        embedder, index, reranker, settings, key_digest, public, inspect
    )


def inspector_override(run_dir: str | Path) -> list[str]:
    """`serve.inspect_run=RUN_DIR` when the run folder holds a finished mining run, else nothing: a server
    started with `--run` shows that run's mining inspector at /inspect (a --set given after wins)."""
    from unime_ray.inspector import mining_dir

    try:
        mining_dir(Path(run_dir) / "mining")
    except FileNotFoundError:
        return []
    return [f"serve.inspect_run={run_dir}"]


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point of Serve config files (`serve deploy`): args `{config: FILE, run: RUN_DIR, overrides:
    [key=value, ...]}`, as `unime-ray serve --config FILE --run RUN_DIR --set key=value` reads them.

    `serve run unime_ray.serve.app:app_builder config=jobs/configs/tiny.yaml run=runs/tiny` works too."""
    from unime_ray.runs import run_overrides

    unknown = set(args) - {"config", "run", "overrides"}
    if unknown:
        raise ValueError(f"unknown app args {sorted(unknown)}; expected 'config', 'run' and 'overrides'")
    overrides = args.get("overrides") or []
    run = run_overrides(args["run"]) + inspector_override(args["run"]) if args.get("run") else []
    return build_app(
        load_config(args.get("config"), run + ([overrides] if isinstance(overrides, str) else overrides))
    )


def main(argv: list[str] | None = None) -> None:
    from unime_ray.ray_utils import init_ray, start_serve, stop_serve

    p = argparse.ArgumentParser(
        prog="unime-ray serve",
        description="Serve search, embed and rerank over HTTP with Ray Serve (see unime_ray/serve/app.py).",
    )
    add_config_args(p, default="jobs/configs/tiny.yaml", run=True)
    args = p.parse_args(argv)
    if args.run:
        args.overrides = inspector_override(args.run) + args.overrides
    cfg = config_from_args(args)
    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        # A local Ray: its Serve proxy will listen here. (On a cluster it listens on the cluster's
        # nodes, where a running Serve is updated in place.)
        try:
            check_port_free(cfg.serve.host, cfg.serve.port)
        except OSError as e:
            raise SystemExit(f"[serve] stopped: {e.strerror}") from None
    try:
        app = build_app(cfg)  # a missing or mismatched index fails here, in a second, before any deploy
    except (FileNotFoundError, ValueError) as e:  # IndexMismatchError too; the message says the fix
        raise SystemExit(f"error: {e}") from None
    init_ray(cfg.ray.address, verbose=cfg.ray.verbose)
    start_serve(cfg.serve.host, cfg.serve.port, cfg.ray.verbose)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it as cleanly as Ctrl-C
    try:  # Ctrl-C stops it cleanly at any point, also while serve.run still waits for the app to run
        serve.run(app, name="unime", route_prefix="/")
        print(f"serving http://{cfg.serve.host}:{cfg.serve.port} (OpenAPI: /docs); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop_serve()
