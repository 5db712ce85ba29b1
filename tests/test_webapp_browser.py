"""The web app in a real browser: `python app.py` with the tiny CLIP on a free port, driven by
Playwright in Debian's Chromium (apt-get install chromium; .ci/run installs it). Skipped, with
the reason, only where no Chromium binary is found (and failed then under .ci/run).

The tests share one page and run in file order (bad upload, image, video); the last one writes
a screenshot of each tab to docs/ for the README. They assert what a user sees: an element's
visibility (and that nothing covers it), its text, the files they download.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
SETTINGS = """\
image: {n_aug: 2, num_scales: 3, skip_n33d: 8, skip_n33u: 8, mixed_precision: "off"}
video: {grid_atlas_resolution: 300, num_scales: 3, skip_n33d: 8, skip_n33u: 8, n_aug: 2, fps: 5,
        save_model_starting_epoch: 2}
atlas: {grid_levels: 5, grid_max_resolution: 256, grid_mapping_cell: 8, grid_alpha_width: 32, samples_batch: 1000}
"""
TIMEOUT_MS = 120_000


def find_chromium():
    for name in (os.environ.get("CHROMIUM"), *CHROMIUM_NAMES):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_clip_file):
    """The app as a user starts it, on a free localhost port; yields (url, results folder)."""
    root = tmp_path_factory.mktemp("webapp")
    (root / "settings.yaml").write_text(SETTINGS)
    port = free_port()
    log = open(root / "app.log", "w")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "app.py"), "--port", str(port), "--clip", str(tiny_clip_file),
         "--results", str(root / "results"), "--atlases", str(root / "atlases"),
         "--settings", str(root / "settings.yaml")],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(root / "gradio-cache")})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"the app did not start:\n{(root / 'app.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield url, root / "results", root / "gradio-cache"
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    chromium = find_chromium()
    if chromium is None:
        reason = "no Chromium binary found (apt-get install chromium, or set CHROMIUM=/path/to/chrome)"
        if os.environ.get("TEXT2LIVE_REQUIRE_BROWSER"):  # set by .ci/run, which installs it
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, app):
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app[0])
    page.wait_for_selector("#run")
    yield page
    page.close()


def wait_for_text(page, selector: str, text: str):
    page.wait_for_function("([s, t]) => document.querySelector(s)?.innerText.includes(t)", arg=[selector, text],
                           timeout=TIMEOUT_MS)


def has_value(page, selector: str, value: str):
    """`selector`'s field shows `value` (waiting for it: an example or a finished run fills it
    in a moment after the click)."""
    from playwright.sync_api import expect
    expect(page.locator(selector)).to_have_value(value, timeout=TIMEOUT_MS)


def seen(locator, text: str | None = None):
    """The element is shown to the user: visible, with `text`, and nothing covers it (a trial
    click checks that it would receive the click)."""
    locator.wait_for(state="visible", timeout=TIMEOUT_MS)
    if text is not None:
        locator.filter(has_text=text).wait_for(state="visible", timeout=TIMEOUT_MS)
    locator.click(trial=True, timeout=10_000)
    return locator


def fill(page, values: dict):
    for selector, value in values.items():
        page.fill(f"{selector} input, {selector} textarea", str(value))


def download(page, link_selector: str, folder: Path) -> Path:
    with page.expect_download() as info:
        page.click(link_selector)
    path = folder / info.value.suggested_filename
    info.value.save_as(path)
    return path


def test_an_unreadable_upload_shows_the_message_and_writes_nothing(page, app, tmp_path):
    before = sorted(app[1].iterdir())
    broken = tmp_path / "holiday.jpg"
    broken.write_bytes(b"not a photo at all" * 50)
    page.set_input_files("#photo input[type=file]", str(broken))
    wait_for_text(page, "#photo-note", "holiday.jpg is not a readable image")
    page.locator("[data-testid='toast-body']").filter(has_text="holiday.jpg is not a readable image").wait_for()
    page.click("#run")  # the photo was refused, so there is nothing to run
    toast = page.locator("[data-testid='toast-body']").filter(has_text="no photo; upload one")
    toast.wait_for()
    toast.get_by_role("button").last.click()  # errors stay until closed (x)
    toast.wait_for(state="detached")
    assert page.locator("[data-testid='toast-body']").filter(has_text="no photo").count() == 0
    # a photo over Pillow's decompression limit: its size in one line, not a bare "Error"
    bomb = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 megapixels in a few kB
    page.set_input_files("#photo input[type=file]", str(bomb))
    seen(page.locator("#photo-note .t2l-refused"), "huge.png is 400 megapixels; upload a photo of at most 40")
    assert page.locator("#photo-note").inner_text().strip() == \
        "huge.png is 400 megapixels; upload a photo of at most 40 megapixels"
    page.get_by_text("cat with leopard fur").first.click()  # the example's photo back, for the screenshot
    assert sorted(app[1].iterdir()) == before


def queue_a_short_run(browser, url: str):
    """Another user's page: the first example, 4 steps at 64 px, Run pressed."""
    other = browser.new_page(viewport={"width": 1280, "height": 900})
    other.set_default_timeout(TIMEOUT_MS)
    other.goto(url)
    other.get_by_text("cat with leopard fur").first.click()
    other.wait_for_selector("#photo img")
    fill(other, {"#steps": 4, "#size": 64, "#preview-every": 2})
    other.click("#run")
    return other


def test_image_tab_runs_shows_progress_and_previews_stops_and_downloads(page, browser, app, tmp_path):
    page.get_by_text("cat with leopard fur").first.click()  # an example fills in every field
    has_value(page, "#comp textarea", "cat with leopard fur")
    has_value(page, "#screen textarea", "leopard fur")
    has_value(page, "#bootstrap textarea", "cat")
    page.wait_for_selector("#photo img")

    # steps beyond the page's bound: refused at once, and the progress line says why
    fill(page, {"#steps": 10**12, "#size": 64, "#preview-every": 5})
    page.click("#run")
    why = "steps must be a whole number from 1 to 100000; got 1000000000000"
    seen(page.locator("#progress .t2l-failed"), f"refused: {why}")
    toast = page.locator("[data-testid='toast-body']").filter(has_text=why)
    toast.wait_for()
    toast.get_by_role("button").last.click()
    assert page.is_enabled("#run")

    # a long run, stopped: it ends cleanly with the result so far; a second press is not counted
    fill(page, {"#steps": 5000})
    page.dblclick("#run")
    wait_for_text(page, "#progress", "/ 5000")
    assert page.is_disabled("#run")  # one run per page: Run comes back when it ends
    # meanwhile another user's run waits in the queue, and their page says where, where it can be seen
    other = queue_a_short_run(browser, app[0])
    seen(other.locator("#queue-note .t2l-queue"), "Waiting in the queue: 1 run ahead of yours")
    assert "/ 5000" in page.inner_text("#progress")  # one run at a time
    # a third user queues a run and thinks better of it: Stop takes it out of the queue
    third = queue_a_short_run(browser, app[0])
    seen(third.locator("#queue-note .t2l-queue"), "2 runs ahead of yours")
    third.click("#stop")
    seen(third.locator("#queue-note .t2l-queue"), "Stopped while waiting in the queue: your run will not start.")
    third.wait_for_function("!document.querySelector('#run').disabled")
    third.click("#stop")  # Stop on an idle page does nothing: no message, nothing cancelled later
    page.click("#stop")
    stopped = page.wait_for_function(
        "() => document.querySelector('#progress')?.innerText.match(/stopped: step (\\d+) \\/ 5000/)?.[1]",
        timeout=TIMEOUT_MS)
    done = int(stopped.json_value())  # read in the same look as the wait: the bar may re-render after it
    assert 5 <= done < 5000 and done % 5 == 0
    wait_for_text(page, "#command", f"n_epochs={done}")
    wait_for_text(other, "#progress", "done: step 4 / 4")  # the queued run went next
    assert other.locator("#queue-note .t2l-queue").count() == 0  # its place in the queue is gone with it
    assert third.locator("[data-testid='toast-body']").count() == 0
    # the third user's next run is theirs and runs (the idle Stop cancelled nothing)
    third.click("#run")
    wait_for_text(third, "#progress", "done: step 4 / 4")
    assert len(list(app[1].glob("image-*"))) == 3  # the double press and the run taken out of the queue never ran
    other.close()
    third.close()
    layer = download(page, "#downloads a[download='edit_layer.png']", tmp_path / "stopped")
    with Image.open(layer) as img:
        assert img.mode == "RGBA" and img.size == (96, 64)  # 451x300 cat, short side 64

    # a short run to its end: progress with the time left, live previews, results, downloads
    page.wait_for_function("!document.querySelector('#run').disabled")
    fill(page, {"#steps": 30})
    page.click("#run")
    wait_for_text(page, "#progress", "/ 30 ·")
    wait_for_text(page, "#progress", "left")  # "step 5 / 30 · 3 s elapsed · about 9 s left"
    page.wait_for_selector("#composite img")  # the live preview, with the edit over green and alpha
    assert page.locator("#edit-over-green img").count() == 1 and page.locator("#alpha img").count() == 1
    wait_for_text(page, "#progress", "done: step 30 / 30")
    page.wait_for_selector("#loss-plot img")
    # the RGBA edit layer is shown over a checkerboard, not over white
    background = page.eval_on_selector("#edit-layer img", "e => getComputedStyle(e).backgroundImage")
    assert "conic-gradient" in background
    assert "gradient" not in page.eval_on_selector("#composite img", "e => getComputedStyle(e).backgroundImage")
    layer = download(page, "#downloads a[download='edit_layer.png']", tmp_path)
    with Image.open(layer) as img:
        assert img.format == "PNG" and img.mode == "RGBA" and img.size == (96, 64)
    assert "n_epochs" not in page.inner_text("#command")
    assert page.inner_text("#command").strip().endswith("results_folder=results")
    # the zip: config, input, final images, model and loss log; no checkpoints unless asked for
    archive = download(page, "#downloads a[download$='.zip']", tmp_path)
    with zipfile.ZipFile(archive) as z:
        parts = {name.split("/", 1)[1] for name in z.namelist()}
    assert {"config.yaml", "input.jpg", "final/composite.png", "final/edit_layer.png", "model.pt", "losses.csv",
            "REPRODUCE.txt"} <= parts
    assert not any(part.startswith(("checkpoints/", "intermediate/")) for part in parts)
    # downloads and previews are served from the results folder: Gradio's cache holds only uploads
    cached = [p.name for p in app[2].rglob("*") if p.is_file()]
    assert not [name for name in cached if name.endswith(".zip") or name in ("composite.png", "edit_layer.png")]


def test_video_tab_trains_an_atlas_from_an_upload_and_edits_it(page, app, tmp_path):
    import imageio.v2 as imageio
    import skimage.data
    photo = np.asarray(skimage.data.coffee())
    video = tmp_path / "coffee.mp4"
    imageio.mimwrite(video, [photo[100:164, 10 * t:10 * t + 96] for t in range(6)], fps=5, macro_block_size=16)

    page.get_by_role("tab", name="Video").click()
    # the tab is its two steps, each with its settings on the left and what it shows on the right
    step_1, step_2 = page.get_by_role("heading", name="1. An atlas"), page.get_by_role("heading", name="2. The edit")
    seen(step_1)
    assert page.locator("#v-comp").bounding_box()["y"] > step_2.bounding_box()["y"] > \
        page.locator("#atlas-run").bounding_box()["y"]
    for left, right in (("#atlas", "#atlas-preview"), ("#atlas-run", "#atlas-progress"), ("#v-comp", "#v-progress"),
                        ("#v-run", "#v-preview")):
        assert page.locator(right).bounding_box()["x"] >= sum(
            page.locator(left).bounding_box()[k] for k in ("x", "width")), (left, right)
    # the CPU note gives the video's own defaults, the comp text's hint speaks of a video
    seen(page.get_by_text("so the video defaults are small too: an atlas of 2000 steps at 240 px"))
    seen(page.locator("#v-comp").get_by_text("What every frame of the edited video shows"))
    # GIF is not offered as a video
    assert ".gif" not in (page.get_attribute("#video-file input[type=file]", "accept") or "")

    page.set_input_files("#video-file input[type=file]", str(video))
    page.wait_for_selector("#video-file a[download]")
    fill(page, {"#atlas-steps": 20, "#atlas-size": 32})
    page.click("#atlas-run")
    wait_for_text(page, "#atlas-progress", "atlas 'coffee' done")
    page.wait_for_selector("#atlas-preview img")
    has_value(page, "#atlas input", "coffee")
    # trained without masks: it has only a background layer, and the page picks it
    seen(page.locator("#layer").get_by_text("trained without object masks: it has only a background layer"))
    assert page.locator("#layer input[type=radio]").count() == 1
    assert page.locator("#layer input[value='background']").is_checked()

    fill(page, {"#v-comp": "a table covered in snow", "#v-screen": "snow", "#v-steps": 4, "#v-preview-every": 2})
    page.click("#v-run")
    wait_for_text(page, "#v-progress", "done: step 4 / 4")
    page.wait_for_selector("#edited-video video")
    page.wait_for_selector("#atlases img")
    names = {page.locator("#v-downloads a[download]").nth(i).get_attribute("download")
             for i in range(page.locator("#v-downloads a[download]").count())}
    assert {"edited.mp4", "side_by_side.mp4", "edit_layer.webm", "atlas_edited.png"} <= names
    webm = download(page, "#v-downloads a[download='edit_layer.webm']", tmp_path)
    assert webm.read_bytes()[:4] == b"\x1a\x45\xdf\xa3"  # a Matroska/WebM file
    assert "conic-gradient" in page.eval_on_selector("#alpha-video video", "e => getComputedStyle(e).backgroundImage")

    # the end of the run: a screenshot of each tab for the README, of a tab whose run finished
    # (run alone, with -k, this test leaves the Image tab empty: its screenshot is kept as it was)
    for tab, progress, name in (("Video", "#v-progress", "webapp_video.png"),
                                ("Image", "#progress", "webapp_image.png")):
        page.get_by_role("tab", name=tab).click()
        time.sleep(1)
        if "done: step" in page.inner_text(progress):
            save_screenshot(page.screenshot(full_page=True), REPO / "docs" / name)


def save_screenshot(png: bytes, path: Path, width: int = 1000):
    """A page screenshot scaled to `width` and reduced to 256 colours (small enough for the repository)."""
    import io
    with Image.open(io.BytesIO(png)) as img:
        img = img.convert("RGB")
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
        img.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
