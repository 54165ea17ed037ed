"""The page for people (`GET /`) in a real headless Chromium against the real service with the
demo models, as a person meets it: the API key asked for, each sample button answered rightly
(the classifier names each shape, the detector and the segmenter find the four of the scene,
the demo pipeline boxes and names each, drawn on the canvas), the samples drawn as
`drawn_shapes.py` draws them, an uploaded file's answer drawn, a bad file's error shown as the
service words it.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); skipped without.
With CONVNEXT_SERVE_SCREENSHOTS=<folder> it saves a screenshot of each task (the docs').
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.train.progress import write_progress

from .demo_models import demo_checkpoints
from .drawn_shapes import KINDS, PAGE_SAMPLES, page_sample
from .live_service import API_KEY, run_service
from .test_service import photo

webdriver = pytest.importorskip("selenium.webdriver")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("needs chromium and chromedriver (Debian)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.needs_models("demo")

BOX = (60, 50, 220, 190)  # the object in the test photo (x0, y0, x1, y1)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    ckpt = demo_checkpoints()
    models = [
        {"name": "shapes", "checkpoint": str(ckpt["classify"]), "max_batch_size": 4},
        {"name": "boxes", "checkpoint": str(ckpt["detect"]), "max_batch_size": 4},
        {"name": "regions", "checkpoint": str(ckpt["segment"]), "max_batch_size": 4},
    ]
    folder = tmp_path_factory.mktemp("page")
    progress = folder / "later.progress.json"  # as a training run writes it
    write_progress(progress, state="training", epoch=1, epochs=2, fraction=0.4, eta_s=300)
    training = [{"name": "later-boxes", "task": "detect", "progress_file": str(progress)}]
    pipeline = {"name": "shapes-inside-boxes", "detector": "boxes", "steps": [{"model": "shapes"}]}
    segmented = {**pipeline, "name": "regions-inside-boxes", "steps": [{"model": "regions"}]}
    yield from run_service(folder, models, {}, training=training, pipelines=[pipeline, segmented])


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1100,800",
    ):
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


def answered(browser, start) -> None:
    """Do `start()` (a click that sends a request) and wait for the page's answer or error:
    the page counts each request it ends (an error shown before may still be on the page
    until the new request starts)."""
    done = browser.execute_script("return Number(document.body.dataset.done || 0)")
    start()
    WebDriverWait(browser, 60).until(
        lambda b: b.execute_script("return Number(document.body.dataset.done || 0)") > done
    )


def run(browser, tmp_path: Path, task: str, data: bytes, name: str = "photo.jpg") -> None:
    Select(browser.find_element(By.ID, "task")).select_by_value(task)
    path = tmp_path / name
    path.write_bytes(data)
    files = browser.find_element(By.ID, "files")
    browser.execute_script("arguments[0].value = ''", files)  # send_keys adds to a multiple
    files.send_keys(str(path))
    answered(browser, browser.find_element(By.ID, "run").click)


def run_sample(browser, task: str, sample: str) -> None:
    Select(browser.find_element(By.ID, "task")).select_by_value(task)
    button = browser.find_element(By.CSS_SELECTOR, f"[data-sample='{sample}']:not([data-task])")
    answered(browser, button.click)
    assert not browser.find_element(By.ID, "error").text


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


def near_edge(mask: np.ndarray, width: int = 3) -> np.ndarray:
    """The pixels within `width` of a mask's outline."""
    grown, shrunk = mask.copy(), mask.copy()
    for axis in (0, 1):
        for shift in range(-width, width + 1):
            grown |= np.roll(mask, shift, axis)
            shrunk &= np.roll(mask, shift, axis)
    return grown & ~shrunk


def test_the_samples_are_drawn_as_the_held_out_set_draws_them(page):
    """The page's samples are in the demo models' held-out test set: the same picture."""
    for name in PAGE_SAMPLES:
        data_url = page.execute_async_script(
            "const done = arguments[1];"
            "sample(arguments[0]).then((blob) => {"
            "  const reader = new FileReader(); reader.onload = () => done(reader.result);"
            "  reader.readAsDataURL(blob); });",
            name,
        )
        png = base64.b64decode(data_url.split(",", 1)[1])
        drawn = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        expected = page_sample(name).image.astype(int)
        assert drawn.shape == expected.shape
        differ = np.abs(drawn - expected).max(axis=2) > 2
        # the canvas antialiases the shapes' outlines, Pillow does not: alike but there
        edges = np.zeros(differ.shape, bool)
        for _, mask in page_sample(name).shapes:
            edges |= near_edge(mask)
        assert not differ[~edges].any() and differ.mean() < 0.03, (name, differ.mean())


@pytest.mark.parametrize(
    "sample, kind",
    [("square", "square"), ("disc", "circle"), ("triangle", "triangle"), ("star", "star")],
)
def test_each_sample_is_classified_as_its_shape(page, sample, kind):
    run_sample(page, "classify", sample)
    bars = page.find_elements(By.CSS_SELECTOR, ".result .bar")
    assert bars and bars[0].find_element(By.CSS_SELECTOR, ".name").text == kind
    widths = [b.find_element(By.CSS_SELECTOR, ".fill").size["width"] for b in bars]
    assert widths == sorted(widths, reverse=True)
    assert "shapes" in page.find_element(By.ID, "time").text
    if sample == "star":
        screenshot(page, "classify")


def changed_by_answer(page, sample: str) -> np.ndarray:
    """Where the first result's canvas differs from the sample it was drawn over."""
    original = page_sample(sample).image.astype(int)
    return np.abs(canvas_pixels(page).astype(int) - original).sum(axis=2) > 30


def test_detect_finds_the_four_shapes_of_the_scene_and_draws_them(page):
    run_sample(page, "detect", "scene")
    side = page.find_element(By.CSS_SELECTOR, ".result .side").text
    assert "4 detection(s)" in side
    labels = [line.split('"')[3] for line in side.splitlines() if '"label"' in line]
    assert sorted(labels) == sorted(KINDS)
    changed = changed_by_answer(page, "scene")
    for _, mask in page_sample("scene").shapes:
        assert changed[mask].mean() > 0.8  # each mask, blended over its shape
    assert changed[110:130, 140:180].mean() < 0.05  # the ground between, left as it was
    screenshot(page, "detect")


def test_segment_colours_the_four_shapes_of_the_scene(page):
    run_sample(page, "segment", "scene")
    legend = page.find_element(By.CSS_SELECTOR, ".result .legend").text
    assert all(kind in legend for kind in KINDS), legend
    changed = changed_by_answer(page, "scene")
    for _, mask in page_sample("scene").shapes:
        assert changed[mask].mean() > 0.8
    assert changed[110:130, 140:180].mean() < 0.05
    screenshot(page, "segment")


def test_the_pipeline_sample_boxes_each_shape_with_what_the_classifier_says_of_it(page):
    """The sample that runs the demo pipeline: the task switches to it, the scene's four
    shapes are boxed, each box labelled with what the classifier said of its crop."""
    button = page.find_element(By.CSS_SELECTOR, "[data-sample='scene'][data-task='pipeline']")
    answered(page, button.click)
    assert not page.find_element(By.ID, "error").text
    assert Select(page.find_element(By.ID, "task")).first_selected_option.text == "pipeline"
    assert "shapes-inside-boxes" in page.find_element(By.ID, "time").text
    assert "4 box(es)" in page.find_element(By.CSS_SELECTOR, ".result .side").text
    items = [li.text for li in page.find_elements(By.CSS_SELECTOR, ".result .boxes li")]
    # "<detector's label> <score> → <classifier's label> <score>"
    said = [(item.split()[0], item.split("→ ")[1].split()[0]) for item in items]
    assert sorted(named for _, named in said) == sorted(KINDS), items
    assert all(found == named for found, named in said), items
    changed = changed_by_answer(page, "scene")
    for _, mask in page_sample("scene").shapes:
        ys, xs = np.nonzero(mask)
        top, left, right = ys.min(), xs.min(), xs.max()
        edge = changed[max(0, top - 4) : top + 4, left + 5 : right - 5]
        assert edge.any(axis=0).mean() > 0.8  # the box's top edge, drawn along its width
    assert changed[110:130, 140:180].mean() < 0.05
    screenshot(page, "pipeline")


def test_a_segment_pipeline_colours_each_box_with_the_map_of_its_crop(page):
    """A pipeline chosen in the list, its second model a segmenter: each box's map, placed by
    its crop, colours the shape inside it, and the list names the class it found there."""
    Select(page.find_element(By.ID, "task")).select_by_value("pipeline")
    Select(page.find_element(By.ID, "model")).select_by_value("regions-inside-boxes")
    button = page.find_element(By.CSS_SELECTOR, "[data-sample='scene']:not([data-task])")
    answered(page, button.click)
    assert not page.find_element(By.ID, "error").text
    assert "regions-inside-boxes" in page.find_element(By.ID, "time").text
    items = [li.text for li in page.find_elements(By.CSS_SELECTOR, ".result .boxes li")]
    assert len(items) == 4 and all(i.split()[0] in i.split("→ ")[1] for i in items), items
    changed = changed_by_answer(page, "scene")
    for _, mask in page_sample("scene").shapes:
        assert changed[mask].mean() > 0.8  # the map, blended over the shape
    assert changed[110:130, 140:180].mean() < 0.05


def test_an_uploaded_file_is_answered_and_drawn(page, tmp_path):
    data, _ = photo("green", box=BOX, disc=True)
    original = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    run(page, tmp_path, "detect", data)
    assert not page.find_element(By.ID, "error").text
    changed = np.abs(canvas_pixels(page).astype(int) - original).sum(axis=2) > 30
    x0, y0, x1, y1 = BOX
    assert changed[y0 + 20 : y1 - 20, x0 + 20 : x1 - 20].mean() > 0.9  # the mask, blended
    assert changed[y0 - 3 : y0 + 3, x0 + 20 : x1 - 20].mean() > 0.5  # the box's top edge
    assert "circle" in page.find_element(By.CSS_SELECTOR, ".result .side").text


def test_a_model_still_training_is_listed_with_its_progress(page):
    Select(page.find_element(By.ID, "task")).select_by_value("detect")
    options = Select(page.find_element(By.ID, "model")).options
    assert [(o.text, o.is_enabled()) for o in options] == [
        ("boxes", True),
        ("later-boxes (training, 40%)", False),
    ]


def test_a_bad_file_shows_the_services_error(page, tmp_path):
    run(page, tmp_path, "classify", b"this is not an image", name="notes.jpg")
    assert page.find_element(By.ID, "error").text.startswith("invalid_image: ")
