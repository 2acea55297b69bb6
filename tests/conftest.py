"""Session fixtures: tiny real-architecture models and the synthetic world are built once per test
session (seconds); Ray, when a test needs it, runs locally on 127.0.0.1."""

from __future__ import annotations

import pytest

from unime_ray.data.synthetic import make_world
from unime_ray.models.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("models") / "qwen2-vl", "qwen2-vl")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("models") / "llava-ov", "llava-ov")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("world")
    make_world(path, seed=0)
    return path


@pytest.fixture(scope="session")
def local_ray():
    import ray

    from unime_ray.ray_utils import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
