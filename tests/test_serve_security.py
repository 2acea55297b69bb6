"""The Serve app's safety checks that need no running server: who may start without a key, which Host
names it answers, that a busy port is refused, which image formats are ever tried (query bytes, corpus
and MMEB files). (The checks through live HTTP are in tests/test_serve_app.py.)"""

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError

from unime_ray.config import Config, ServeConfig
from unime_ray.data.images import IMAGE_FORMATS
from unime_ray.data.mmeb import ReadState
from unime_ray.models.embedder import load_image
from unime_ray.serve.app import (
    allowed_hosts,
    build_app,
    check_exposure,
    check_port_free,
    decode_image,
    image_pixels,
    is_loopback,
    model_image,
)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_hosts_may_serve_without_a_key(host):
    assert is_loopback(host)
    check_exposure(ServeConfig(host=host))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.7", "search.example.org", "localhost.evil"])
def test_a_keyless_start_off_loopback_is_refused(host, tmp_path):
    assert not is_loopback(host)
    cfg = Config()
    cfg.run.output_dir = str(tmp_path)  # no index there: the refusal must come first
    cfg.serve.host = host
    with pytest.raises(ValueError, match="reachable from other machines, and no API key is set"):
        build_app(cfg)
    # either of the two ways out passes this check (the start then fails on the missing index)
    for way_out in ({"api_key_env": "SOME_KEY"}, {"allow_public_without_key": True}):
        check_exposure(ServeConfig(host=host, **way_out))


def test_allowed_host_names():
    assert allowed_hosts(ServeConfig()) == ["127.0.0.1", "localhost", "::1"]
    assert allowed_hosts(ServeConfig(host="0.0.0.0")) == ["*"]
    assert allowed_hosts(ServeConfig(host="10.0.0.7")) == ["10.0.0.7", "127.0.0.1", "localhost", "::1"]
    named = ServeConfig(host="0.0.0.0", allowed_hosts=["search.example.org", "*.example.org"])
    assert allowed_hosts(named) == ["search.example.org", "*.example.org"]


def listening_like_serve(host: str = "127.0.0.1") -> socket.socket:
    """A socket listening on a free port of `host` with the options Serve's proxy sets (SO_REUSEPORT),
    so a second server with them would share the port without an error."""
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind((host, 0))
    held.listen()
    return held


def test_what_the_port_check_guards_against():
    """A second socket with Serve's options binds the busy port without an error."""
    with listening_like_serve() as held, socket.socket() as twin:
        twin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        twin.bind(("127.0.0.1", held.getsockname()[1]))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "0.0.0.0"])
def test_a_busy_port_is_refused_and_a_free_one_passes(host):
    with listening_like_serve() as held:
        port = held.getsockname()[1]
        with pytest.raises(OSError) as refused:
            check_port_free(host, port)
    assert refused.value.strerror == (
        f"{host}:{port} is in use (Address already in use): another server listens there; stop it, "
        "or choose a free port with --set serve.port=N"
    )
    check_port_free(host, port)  # free once closed, and the probe itself holds nothing
    check_port_free(host, port)


def test_serve_on_a_busy_port_stops_before_ray_starts(tmp_path):
    with listening_like_serve() as held:
        port = held.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        res = subprocess.run(
            [sys.executable, "-m", "unime_ray.cli", "serve", "--set", f"serve.port={port}"]
            + ["--set", f"run.output_dir={tmp_path}"],  # no index there: the port check comes first
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[1],
            env=env,
            timeout=120,
        )
        assert res.returncode == 1
        assert res.stderr.strip().splitlines() == [
            f"[serve] stopped: 127.0.0.1:{port} is in use (Address already in use): another server "
            "listens there; stop it, or choose a free port with --set serve.port=N"
        ]
        assert res.stdout == ""  # not even Ray's "[ray] Ray's own logs" line: no Ray, no Serve
        # the held socket still accepts, and is the only one on the port
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            held.accept()[0].close()
    assert list(tmp_path.iterdir()) == []


# ---- image formats: only PNG, JPEG, WebP, GIF, BMP are ever tried ---------------------------------

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 16 16
%%EndComments
newpath 0 0 moveto 16 16 lineto stroke
showpage
%%EOF
"""


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A stand-in `gs` first on PATH that records every run in a file; Pillow's cached lookup reset."""
    from PIL import EpsImagePlugin

    bin_dir, runs = tmp_path / "bin", tmp_path / "gs-runs.txt"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> {runs}\n')  # renders nothing
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return runs


def test_the_stand_in_ghostscript_runs_when_pillow_may_try_eps(fake_ghostscript):
    """What the checks below guard against: plain Image.open reads EPS bytes and starts `gs` on them."""
    with pytest.raises(Exception):  # noqa: B017 (whatever Pillow makes of the empty rendering)
        Image.open(io.BytesIO(EPS)).load()
    assert fake_ghostscript.exists()


def test_query_eps_is_refused_without_running_anything(fake_ghostscript):
    with pytest.raises(HTTPException) as refused:
        decode_image(EPS, max_pixels=1 << 20)
    assert refused.value.status_code == 415 and "PNG" in refused.value.detail
    assert not fake_ghostscript.exists()


def test_corpus_and_mmeb_images_in_eps_are_refused_without_running_anything(fake_ghostscript, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "drawing.eps").write_bytes(EPS)
    (root / "drawing.png").write_bytes(EPS)  # the extension does not decide the format
    state = ReadState(root, check_images=True)
    assert state.image_problem("drawing.eps") == "corrupt_image"
    assert state.image_problem("drawing.png") == "corrupt_image"
    for name in ("drawing.eps", "drawing.png"):
        with pytest.raises(UnidentifiedImageError):
            load_image(name, root, 28)  # what the embedder runs on corpus images at index time
    assert not fake_ghostscript.exists()


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_documented_formats_decode(fmt):
    out = io.BytesIO()
    Image.new("RGB", (20, 10), (10, 200, 30)).save(out, format=fmt)
    image = decode_image(out.getvalue(), max_pixels=1 << 20)
    assert image.size == (20, 10) and image.mode == "RGB"


def test_other_formats_are_refused():
    out = io.BytesIO()
    Image.new("RGB", (20, 10)).save(out, format="TIFF")
    with pytest.raises(HTTPException) as refused:
        decode_image(out.getvalue(), max_pixels=1 << 20)
    assert refused.value.status_code == 415


# ---- image size: header-checked limits, downscaled right after decoding ---------------------------


def one_colour_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 90, 200)).save(out, format="PNG", optimize=True)
    return out.getvalue()


def test_a_decompression_light_huge_png_is_refused_from_its_header():
    data = one_colour_png(4096, 4096)  # 16.8 MP in a few dozen KB
    assert len(data) < 100_000
    cfg = ServeConfig()
    assert image_pixels(data) == 4096 * 4096 > cfg.max_image_pixels
    with pytest.raises(HTTPException) as refused:
        model_image(data, cfg.max_image_pixels, 336)
    assert refused.value.status_code == 413 and "4096x4096" in refused.value.detail
    # sixteen of them in one 1 MB request: over the request budget too, counted without decoding any
    assert 16 * image_pixels(data) > cfg.max_request_pixels


def test_query_images_are_downscaled_to_the_model_input_right_after_decoding():
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 255, (900, 1200, 3), dtype=np.uint8))
    out = io.BytesIO()
    original.save(out, format="PNG")
    small = Image.open(io.BytesIO(model_image(out.getvalue(), 1 << 24, 56)))
    assert small.size == (56, 56)
    # what the models would have made of the full image (load_image resizes the same way)
    expected = load_image(original, "", 56)
    np.testing.assert_array_equal(np.asarray(load_image(small, "", 56)), np.asarray(expected))
