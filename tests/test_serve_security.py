"""The Serve app's safety checks that need no running server: who may start without a key, which Host
names it answers. (The checks through live HTTP are in tests/test_serve_app.py.)"""

import pytest

from unime_ray.config import Config, ServeConfig
from unime_ray.serve.app import allowed_hosts, build_app, check_exposure, is_loopback


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
