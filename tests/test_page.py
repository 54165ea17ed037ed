"""The page for people (`GET /`) in a real headless Chromium against the real service: the API
key asked for, an image uploaded for each task and the answer drawn (checked on the canvas's
pixels), a bad file's error shown as the service words it.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); skipped without.
With CONVNEXT_SERVE_SCREENSHOTS=<folder> it saves a screenshot of each task (the README's).
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.train.progress import write_progress

from .live_service import API_KEY, run_service
from .service_models import service_checkpoints
from .test_service import photo

webdriver = pytest.importorskip("selenium.webdriver")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("needs chromium and chromedriver (Debian)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

BOX = (60, 50, 220, 190)  # the object in the test photo (x0, y0, x1, y1)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    ckpt = service_checkpoints()
    models = [
        {"name": "colours", "checkpoint": str(ckpt["classify"]), "max_batch_size": 4},
        {"name": "boxes", "checkpoint": str(ckpt["detect"]), "max_batch_size": 4},
        {"name": "regions", "checkpoint": str(ckpt["segment"]), "max_batch_size": 4},
    ]
    folder = tmp_path_factory.mktemp("page")
    progress = folder / "later.progress.json"  # as a training run writes it
    write_progress(progress, state="training", epoch=1, epochs=2, fraction=0.4, eta_s=300)
    training = [{"name": "later-boxes", "task": "detect", "progress_file": str(progress)}]
    yield from run_service(folder, models, {}, training=training)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1100,800"):  # fmt: skip
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(service, browser):
    """The page, opened and given the API key it asks for."""
    browser.get(service.url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_element(By.ID, "keybox").is_displayed())
    assert "API key" in browser.find_element(By.ID, "error").text
    key = browser.find_element(By.ID, "key")
    key.send_keys(API_KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait.until(lambda b: len(Select(b.find_element(By.ID, "model")).options) > 0)
    return browser


def run(browser, tmp_path: Path, task: str, data: bytes, name: str = "photo.jpg") -> None:
    Select(browser.find_element(By.ID, "task")).select_by_value(task)
    path = tmp_path / name
    path.write_bytes(data)
    files = browser.find_element(By.ID, "files")
    browser.execute_script("arguments[0].value = ''", files)  # send_keys adds to a multiple
    files.send_keys(str(path))
    done = browser.execute_script("return Number(document.body.dataset.done || 0)")
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 60).until(
        lambda b: (
            b.execute_script("return Number(document.body.dataset.done || 0)") > done
            or b.find_element(By.ID, "error").text
        )
    )


def canvas_pixels(browser) -> np.ndarray:
    """The first result's canvas as an (H, W, 3) array."""
    width, height, flat = browser.execute_script(
        "const c = document.querySelector('.result canvas');"
        "return [c.width, c.height, Array.from(c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data)];"
    )
    return np.array(flat, np.uint8).reshape(height, width, 4)[..., :3]


def screenshot(browser, name: str) -> None:
    folder = os.environ.get("CONVNEXT_SERVE_SCREENSHOTS")
    if folder:
        browser.save_screenshot(str(Path(folder) / f"page-{name}.png"))


def test_the_page_is_served_open(service):
    import requests

    r = requests.get(service.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<script>" in r.text and "http" not in r.text.split("<script>")[1]  # nothing remote


def test_classify_draws_the_top_k_as_bars(page, tmp_path):
    data, _ = photo("red", box=BOX)
    run(page, tmp_path, "classify", data)
    assert not page.find_element(By.ID, "error").text
    bars = page.find_elements(By.CSS_SELECTOR, ".result .bar")
    assert bars and bars[0].find_element(By.CSS_SELECTOR, ".name").text == "red"
    widths = [b.find_element(By.CSS_SELECTOR, ".fill").size["width"] for b in bars]
    assert widths[0] > 100 and widths == sorted(widths, reverse=True)
    assert "colours" in page.find_element(By.ID, "time").text
    screenshot(page, "classify")


def drawn_over(page, tmp_path, task: str, colour: str) -> np.ndarray:
    """Run `task` on a photo of a `colour` object in BOX; where the canvas differs from it."""
    data, _ = photo(colour, box=BOX)
    original = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    run(page, tmp_path, task, data)
    assert not page.find_element(By.ID, "error").text
    return np.abs(canvas_pixels(page).astype(int) - original).sum(axis=2) > 30


def test_detect_draws_the_box_and_mask(page, tmp_path):
    changed = drawn_over(page, tmp_path, "detect", "green")
    x0, y0, x1, y1 = BOX
    assert changed[y0 + 20 : y1 - 20, x0 + 20 : x1 - 20].mean() > 0.9  # the mask, blended
    assert changed[5:30, 250:315].mean() < 0.05  # the background, left as it was
    assert changed[y0 - 3 : y0 + 3, x0 + 20 : x1 - 20].mean() > 0.5  # the box's top edge
    screenshot(page, "detect")


def test_segment_draws_the_map_and_a_legend(page, tmp_path):
    changed = drawn_over(page, tmp_path, "segment", "blue")
    assert "blue" in page.find_element(By.CSS_SELECTOR, ".result .legend").text
    x0, y0, x1, y1 = BOX
    assert changed[y0 + 20 : y1 - 20, x0 + 20 : x1 - 20].mean() > 0.9  # the object's class
    assert changed[5:30, 250:315].mean() < 0.05  # the background class, left as it was
    screenshot(page, "segment")


def test_a_model_still_training_is_listed_with_its_progress(page):
    Select(page.find_element(By.ID, "task")).select_by_value("detect")
    options = Select(page.find_element(By.ID, "model")).options
    assert [(o.text, o.is_enabled()) for o in options] == [
        ("boxes", True), ("later-boxes (training, 40%)", False)]  # fmt: skip


def test_a_bad_file_shows_the_services_error(page, tmp_path):
    run(page, tmp_path, "classify", b"this is not an image", name="notes.jpg")
    deadline = time.monotonic() + 10
    while not page.find_element(By.ID, "error").text and time.monotonic() < deadline:
        time.sleep(0.1)
    assert page.find_element(By.ID, "error").text.startswith("invalid_image: ")
