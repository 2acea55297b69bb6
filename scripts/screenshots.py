"""The documentation's screenshots of the Serve app's pages: serve a finished run as the quickstart says
(`unime-ray serve --run RUN_DIR`, on a free port of 127.0.0.1), search it and open its mining inspector
in a headless chromium (`unime_ray.serve.browser`, as tests/test_web.py drives it), and write
`search.png` and `inspect.png` to OUT_DIR.

    .venv/bin/unime-ray demo                                        # -> runs/tiny
    .venv/bin/python scripts/screenshots.py runs/tiny docs/img      # -> docs/img/search.png, inspect.png

The search is the demo's own: an image of the world's eval set (its thumbnail shows beside the form)
searched among the captions the demo indexed, reranked listwise; the results are captions, so each shows
"text only" where an indexed image would show its thumbnail. The inspector's page shows the mined queries'
images as thumbnails. The PNGs are reduced to a 256-colour palette (flat page colours, small images) to
keep them small in the repository. The server is stopped with Ctrl-C (SIGINT), as the quickstart says.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

from unime_ray.config import load_config
from unime_ray.io import atomic_path
from unime_ray.ray_utils import free_port
from unime_ray.record import recorded_config
from unime_ray.serve.browser import chromium, open_search, run_search, wait, wait_for_thumbnails

WIDTH, SEARCH_HEIGHT, INSPECT_HEIGHT = 1100, 1000, 1100  # CSS pixels of the browser window per page
START_S = 300  # the longest wait for the server to say it serves


def serve(run_dir: Path, port: int) -> tuple[subprocess.Popen, list[str]]:
    """`unime-ray serve --run RUN_DIR` on `port`, once it says it serves; its console lines so far (a
    thread keeps appending them). Raises RuntimeError with the console when it stops or is too slow."""
    command = [str(Path(sys.executable).parent / "unime-ray"), "serve", "--run", str(run_dir)]
    proc = subprocess.Popen(
        [*command, "--set", f"serve.port={port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + START_S
    while not any(f"serving http://127.0.0.1:{port}" in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError("the server did not start:\n" + "".join(lines[-40:]))
        time.sleep(0.5)
    return proc, lines


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C, then wait for the server to end."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)


def save_png(driver, out: Path) -> int:
    """The browser's viewport as a palette PNG at `out` (written atomically); its size in bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        driver.save_screenshot(str(shot))
        image = Image.open(shot).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    with atomic_path(out) as tmp_out:
        image.save(tmp_out, format="PNG", optimize=True)
    return out.stat().st_size


def query_image(run_dir: Path) -> Path:
    """The image the demo searches with: the first of the world's eval images (`demo.serve_one_query`)."""
    recorded = recorded_config(run_dir)
    if recorded is None:
        raise SystemExit(f"{run_dir} records no config (run.json): run `unime-ray demo` first")
    image_root = Path(load_config(None, [], base=recorded).data.image_root)
    images = sorted(image_root.glob("eval/*.png"))
    if not images:
        raise SystemExit(f"{image_root / 'eval'}: no query image (*.png)")
    return images[0]


def search_page(driver, url: str, image: Path, out: Path) -> int:
    """The search page after an image query reranked listwise, every thumbnail decoded; the PNG's size."""
    driver.set_window_size(WIDTH, SEARCH_HEIGHT)
    open_search(driver, url)
    driver.find_element("id", "image").send_keys(str(image.resolve()))
    wait(driver, lambda d: d.execute_script("return document.body.dataset.image") == "ready", "image read")
    listwise = driver.find_element("css selector", "input[name=rerank][value=listwise]")
    state = run_search(driver, listwise.click)  # choosing a rerank mode runs the search
    if state != "done":
        raise RuntimeError(f"the search ended in {state}: {driver.find_element('id', 'status').text}")
    wait_for_thumbnails(driver)
    return save_png(driver, out)


def inspect_page(driver, url: str, out: Path) -> int:
    """The mining inspector's page (/inspect) once its report has loaded; the PNG's size."""
    driver.set_window_size(WIDTH, INSPECT_HEIGHT)
    driver.get(url + "/inspect")
    state = "return document.body.dataset.state"
    wait(driver, lambda d: d.execute_script(state) in ("done", "error"), "the inspector's report")
    if driver.execute_script(state) != "done":
        raise RuntimeError(f"the inspector's report did not load: {driver.find_element('id', 'status').text}")
    return save_png(driver, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a finished run, e.g. runs/tiny after `unime-ray demo`")
    p.add_argument("out_dir", type=Path, help="where search.png and inspect.png go, e.g. docs/img")
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    image, port = query_image(args.run_dir), free_port()
    proc, _ = serve(args.run_dir, port)
    try:
        with tempfile.TemporaryDirectory() as profile:
            driver = chromium(profile, WIDTH, SEARCH_HEIGHT)
            try:
                url = f"http://127.0.0.1:{port}"
                for name, size in [
                    ("search.png", search_page(driver, url, image, args.out_dir / "search.png")),
                    ("inspect.png", inspect_page(driver, url, args.out_dir / "inspect.png")),
                ]:
                    print(f"wrote {args.out_dir / name} ({size / 1e3:.0f} kB)")
            finally:
                driver.quit()
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
