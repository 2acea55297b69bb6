"""The Serve app's pages for people, tested over HTTP and in a real headless browser (Debian's chromium
driven by selenium): the search page renders what /v1/search returns (text query, image upload, the
rerank switch), its thumbnails come from /v1/image, which serves a record's image by id only (traversal
and unknown ids: 404), nothing is served without the API key, and /inspect shows the mining inspector's
page of the run the app was started with.

One Serve app and one browser for the module. Everything listens on 127.0.0.1, and the browser resolves
no other host. Screenshots go to each test's tmp_path. Where no chromium / chromedriver / selenium exists
the browser tests skip, saying why; under CI (CI=true) they fail instead, since CI must run them
(scripts/install.sh installs the browser with apt)."""

import base64
import io
import os

import numpy as np
import pytest
import requests
from conftest import free_port
from mined import expected_outcomes
from PIL import Image
from ray import serve

from unime_ray.config import Config, ModelConfig
from unime_ray.inspector import build_report, collect
from unime_ray.models.embedder import Embedder
from unime_ray.serve.app import IMAGE_SIDE, build_app, inspector_override
from unime_ray.serve.browser import (
    BrowserUnavailable,
    chromium,
    open_search,
    run_search,
    wait,
    wait_for_thumbnails,
)
from unime_ray.serve.corpus import read_corpus
from unime_ray.serve.index import CorpusIndex, create_index, index_dir, model_identity

KEY_ENV, KEY = "UNIME_WEB_TEST_KEY", "web-key-456"


@pytest.fixture(scope="module")
def web_app(mined_run, local_ray, tiny_qwen, world, tmp_path_factory):
    cfg = Config()
    cfg.run.output_dir = str(tmp_path_factory.mktemp("web"))
    cfg.data.image_root = str(world / "images")
    cfg.embedder = ModelConfig(path=str(tiny_qwen), image_size=56, max_length=256, batch_size=32)
    cfg.reranker.model = ModelConfig(path=str(tiny_qwen), dtype="float32", image_size=56, max_length=512)
    cfg.serve.api_key_env = KEY_ENV
    cfg.serve.max_top_k = 20
    cfg.serve.inspect_run = str(mined_run)
    # The index embedded in this process: the vectors build_index's Ray Data actors would make, without
    # the seconds of their start-up (tests/test_serve_index.py covers build_index itself).
    records = read_corpus(world / "retrieval" / "captions.jsonl", world / "images", cfg.index).table
    vectors = Embedder(cfg.embedder, image_root=world / "images").embed(records.to_pylist())
    model = model_identity(cfg.embedder)
    create_index(index_dir(cfg), records, vectors, model=model, cfg=cfg.index, image_root=world / "images")

    os.environ[KEY_ENV] = KEY
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="unime-web-test", route_prefix="/")
    yield cfg, f"http://127.0.0.1:{port}"
    serve.shutdown()
    del os.environ[KEY_ENV]


def search(url, query, top_k, rerank="none"):
    body = {"query": query, "top_k": top_k, "rerank": rerank}
    response = requests.post(url + "/v1/search", json=body, headers={"X-API-Key": KEY}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


# ---- over HTTP ----------------------------------------------------------------------------------------


def test_images_are_served_by_record_id_only(web_app, world):
    cfg, url = web_app
    index = CorpusIndex.load(index_dir(cfg))
    records = index.table.to_pylist()
    with_image = next(r for r in records if r["image"])
    text_only = next(r for r in records if not r["image"])

    def get(record_id, key=KEY):
        return requests.get(
            url + "/v1/image", params={"id": record_id}, headers={"X-API-Key": key}, timeout=30
        )

    response = get(with_image["id"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    served = Image.open(io.BytesIO(response.content))
    want = Image.open(world / "images" / with_image["image"]).convert("RGB")
    want.thumbnail((IMAGE_SIDE, IMAGE_SIDE))
    assert served.size == want.size and max(served.size) <= IMAGE_SIDE
    np.testing.assert_array_equal(np.asarray(served.convert("RGB")), np.asarray(want))

    passwd = "../" * 12 + "etc/passwd"
    for bad in [
        "captions/c0000000000000000",  # unknown id
        passwd,  # traversal as an id
        "/etc/passwd",
        with_image["image"],  # a real image's path is not an id
        str(world / "images" / with_image["image"]),
        with_image["id"] + "/../" + with_image["id"],
        text_only["id"],  # a record without an image
        "",
    ]:
        response = get(bad)
        assert response.status_code == 404, (bad, response.status_code, response.text)
        assert "no image for id" in response.json()["detail"]
    # traversal in the URL path itself (sent as is: requests would normalise a literal ../)
    for raw in [
        "/v1/image/..%2f..%2f..%2fetc%2fpasswd",
        "/v1/image/%2e%2e/%2e%2e/etc/passwd",
        "/inspect/..%2fpasswd",
    ]:
        response = requests.get(url + raw, headers={"X-API-Key": KEY}, timeout=30)
        assert response.status_code == 404 and b"root:" not in response.content, raw
    # no key, no image
    assert get(with_image["id"], key="wrong").status_code == 401
    assert requests.get(url + "/v1/image", params={"id": with_image["id"]}, timeout=30).status_code == 401


def test_pages_are_public_and_hold_no_data_the_report_needs_the_key(web_app, mined_run, world):
    cfg, url = web_app
    for path in ["/", "/inspect"]:
        response = requests.get(url + path, timeout=30)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        assert (
            "<script>" in response.text and "captions/" not in response.text and "Shapes" not in response.text
        )
        # no resource from elsewhere: no http(s) URL in any src / href
        assert 'src="http' not in response.text and 'href="http' not in response.text
    assert requests.get(url + "/inspect/report", timeout=30).status_code == 401
    response = requests.get(url + "/inspect/report", headers={"X-API-Key": KEY}, timeout=120)
    assert response.status_code == 200
    assert response.text == build_report(mined_run, world / "images")  # the page `unime-ray inspect` writes


def test_a_run_that_mined_is_served_with_its_inspector(mined_run, tmp_path):
    """`unime-ray serve --run RUN_DIR` serves RUN_DIR's inspector at /inspect when the run mined."""
    assert inspector_override(mined_run) == [f"serve.inspect_run={mined_run}"]
    assert inspector_override(tmp_path) == []  # no mining run there: no /inspect, no error


# ---- in the browser -----------------------------------------------------------------------------------


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the browser tests, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        driver = chromium(tmp_path_factory.mktemp("chromium"))
    except BrowserUnavailable as e:
        _unavailable(str(e))
    yield driver
    driver.quit()


def _open_search(driver, url, key=KEY):
    open_search(driver, url, key)


def _rendered(driver) -> list[dict]:
    """Each rendered result: id, the cosine shown, the cosine rank shown (reranked), its thumbnail."""
    wait_for_thumbnails(driver)
    return driver.execute_script(
        """return [...document.querySelectorAll('#results li.hit')].map(li => ({
            id: li.dataset.id,
            cosine: li.querySelector('.scores').textContent.match(/cosine ([-0-9.]+)/)[1],
            cosineRank: li.dataset.cosineRank,
            thumb: li.querySelector('img.thumb') ? li.querySelector('img.thumb').naturalWidth : null,
            failed: li.querySelector('img.thumb') ? !!li.querySelector('img.thumb').dataset.failed : false,
        }))"""
    )


def _assert_rendered(rows, api):
    assert [r["id"] for r in rows] == [h["id"] for h in api["results"]]
    # shown with 4 decimals; a tolerance, as two requests may be batched differently by the embedder
    shown = np.array([float(r["cosine"]) for r in rows])
    np.testing.assert_allclose(shown, [h["score"] for h in api["results"]], atol=6e-5)
    for row, hit in zip(rows, api["results"]):
        if hit["image"]:  # fetched from /v1/image with the key, decoded by the browser
            assert not row["failed"] and 0 < row["thumb"] <= IMAGE_SIDE, row
        else:
            assert row["thumb"] is None


def test_text_query_renders_the_api_results(browser, web_app, tmp_path):
    _, url = web_app
    _open_search(browser, url)
    browser.find_element("id", "text").send_keys("a red circle on the left")
    topk = browser.find_element("id", "topk")
    topk.clear()
    topk.send_keys("8")
    assert run_search(browser, lambda: browser.find_element("id", "go").click()) == "done"
    rows = _rendered(browser)
    api = search(url, {"text": "a red circle on the left"}, 8)
    assert len(rows) == 8
    _assert_rendered(rows, api)
    assert browser.find_element("id", "status").text.startswith("8 results in ")
    browser.save_screenshot(str(tmp_path / "search-text.png"))


def test_without_the_key_the_page_gets_nothing(browser, web_app, tmp_path):
    _, url = web_app
    _open_search(browser, url, key="")
    browser.find_element("id", "text").send_keys("a red circle on the left")
    assert run_search(browser, lambda: browser.find_element("id", "go").click()) == "error"
    assert browser.find_elements("css selector", "#results li") == []
    assert "401" in browser.find_element("id", "status").text
    browser.find_element("id", "key").send_keys("not-the-key")
    assert run_search(browser, lambda: browser.find_element("id", "go").click()) == "error"
    assert browser.find_elements("css selector", "#results li") == []
    browser.save_screenshot(str(tmp_path / "search-no-key.png"))


def test_image_upload_renders_the_api_results(browser, web_app, world, tmp_path):
    _, url = web_app
    image = world / "images" / "eval" / "00003.png"
    _open_search(browser, url)
    browser.find_element("id", "image").send_keys(str(image))
    wait(browser, lambda d: d.execute_script("return document.body.dataset.image") == "ready", "image read")
    assert browser.find_element("id", "preview").is_displayed()
    assert run_search(browser, lambda: browser.find_element("id", "go").click()) == "done"
    rows = _rendered(browser)
    data_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    api = search(url, {"image": data_url}, 10)
    assert len(rows) == 10
    _assert_rendered(rows, api)
    assert any(r["thumb"] for r in rows)  # an image query finds images of the index (it holds captions too)
    browser.save_screenshot(str(tmp_path / "search-image.png"))


def test_rerank_switch_shows_the_new_order(browser, web_app, tmp_path):
    _, url = web_app
    query = {"text": "a blue triangle at the top"}
    _open_search(browser, url)
    browser.find_element("id", "text").send_keys(query["text"])
    assert run_search(browser, lambda: browser.find_element("id", "go").click()) == "done"
    _assert_rendered(_rendered(browser), search(url, query, 10))
    cosine = [h["id"] for h in search(url, query, 10)["results"]]
    for mode in ["pointwise", "listwise"]:
        # switching the radio re-runs the search with that mode
        radio = browser.find_element("css selector", f"input[name=rerank][value={mode}]")
        assert run_search(browser, radio.click) == "done"
        rows = _rendered(browser)
        api = search(url, query, 10, rerank=mode)
        _assert_rendered(rows, api)
        # each result says where cosine alone had put it
        assert [int(r["cosineRank"]) for r in rows] == [cosine.index(h["id"]) for h in api["results"]]
        info = browser.find_element("id", "rerank-info").text
        assert info.startswith(mode) and f"top {api['rerank']['candidates']}" in info
        if mode == "pointwise":
            assert [h["id"] for h in api["results"]] != cosine  # the random reranker reorders
            assert browser.find_elements("css selector", ".moved.up") and browser.find_elements(
                "css selector", ".moved.down"
            )
        browser.save_screenshot(str(tmp_path / f"search-rerank-{mode}.png"))


def test_inspector_page_in_the_browser(browser, web_app, mined_run, tmp_path):
    _, url = web_app
    state = "return document.body.dataset.state"
    browser.get(url + "/inspect")  # loads at once, with the key the search page kept for this tab, if any
    wait(browser, lambda d: d.execute_script(state) in ("done", "error"), "the first load")
    # without the key: the report is refused, nothing shown
    browser.find_element("id", "key").clear()
    browser.find_element("id", "load").click()
    wait(browser, lambda d: d.execute_script(state) == "error", "a 401")
    assert "401" in browser.find_element("id", "status").text
    assert browser.find_element("id", "report").get_attribute("srcdoc") == ""
    browser.find_element("id", "key").send_keys(KEY)
    browser.find_element("id", "load").click()
    wait(browser, lambda d: d.execute_script(state) == "done", "the report")
    browser.save_screenshot(str(tmp_path / "inspect.png"))

    report, truth = collect(mined_run), expected_outcomes(mined_run)
    browser.switch_to.frame(browser.find_element("id", "report"))
    try:
        sections = browser.find_elements("css selector", "section.query")
        assert [s.get_attribute("data-query-id") for s in sections] == [
            q.id for d in report.datasets for q in d.shown
        ]
        shown = browser.execute_script(
            """return [...document.querySelectorAll('section.query')].map(s => ({
                id: s.dataset.queryId, fallback: s.dataset.fallback,
                rows: [...s.querySelectorAll('tr.cand')].map(r => [r.dataset.candId, r.dataset.dropped])
            }))"""
        )
        for q in shown:
            want = truth[q["id"]]
            assert q["fallback"] == str(int(want["fallback"]))
            assert q["rows"] and all(d == str(int(c in want["dropped"])) for c, d in q["rows"]), q["id"]
        assert any(q["fallback"] == "1" for q in shown)
        # the embedded thumbnails decode in the browser
        widths = browser.execute_script(
            "return [...document.querySelectorAll('img.thumb')].map(i => i.naturalWidth)"
        )
        assert widths and all(0 < w <= 96 for w in widths)
        # a fallback query as shown: its banner, its dropped candidates, its picks (an element screenshot:
        # the sandboxed frame runs no script, so a scrolled frame is not repainted before a page shot)
        fallback = browser.find_element("css selector", "section.query[data-fallback='1']")
        fallback.screenshot(str(tmp_path / "inspect-fallback.png"))
    finally:
        browser.switch_to.default_content()
