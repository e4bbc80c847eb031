"""The web demo in a real headless browser: controller + model worker (tiny random Ferret) + gradio server as
processes on 127.0.0.1; Clear, upload a 56 px image, draw a box with the mouse, ask, get an answer and a drawn
output, Clear again and upload again.

Needs Debian's ``chromium`` (/usr/bin/chromium) and the ``playwright`` Python package (its own browser download
is not used); skipped with the reason when either is missing."""

import json
import os
import time

import pytest
from PIL import Image, ImageDraw
from serve_helpers import free_port, http_ok, make_checkpoint, start_process, stop_process, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.slow


def _requirements() -> str | None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is missing (pip install playwright)"
    return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tokenizer_dir):
    missing = _requirements()
    if missing:
        pytest.skip(missing)
    root = tmp_path_factory.mktemp("stack")
    checkpoint = make_checkpoint(root / "tiny-ferret", tokenizer_dir)
    ports = {name: free_port() for name in ("controller", "worker", "web")}
    controller_url = f"http://127.0.0.1:{ports['controller']}"
    logs = {name: root / f"{name}.log" for name in ports}
    processes = {}
    try:
        processes["controller"] = start_process(
            ["-m", "ferret.serve.controller", "--port", str(ports["controller"]), "--log-level", "warning"],
            logs["controller"])
        processes["worker"] = start_process(
            ["-m", "ferret.serve.model_worker", "--model-path", checkpoint, "--port", str(ports["worker"]),
             "--controller-address", controller_url, "--device", "cpu", "--heart-beat-interval", "2",
             "--log-level", "warning"], logs["worker"])
        processes["web"] = start_process(
            ["-m", "ferret.serve.gradio_web_server", "--controller-url", controller_url, "--port", str(ports["web"]),
             "--model-list-mode", "reload", "--add_region_feature", "--max-output-tokens", "12",
             "--logdir", str(root / "conv_logs"), "--examples-dir", str(root / "examples"), "--log-level", "warning"],
            logs["web"])
        wait_for(lambda: (http_ok(f"{controller_url}/list_models", "POST", {}) or {}).get("models") == ["tiny-ferret"],
                 180, "the worker registered with the controller", interval=0.5, process=processes["worker"],
                 log=logs["worker"])
        web_url = f"http://127.0.0.1:{ports['web']}"
        wait_for(lambda: http_ok(web_url + "/"), 180, "the web server answers", interval=0.5,
                 process=processes["web"], log=logs["web"])
        yield {"url": web_url, "root": root, "logs": logs}
    finally:
        for process in processes.values():
            stop_process(process)


def open_demo(page, url: str, settle: float) -> None:
    from playwright.sync_api import expect

    page.set_default_timeout(60_000)
    page.goto(url, wait_until="domcontentloaded")
    expect(page.locator("#model_selector input")).to_have_value("tiny-ferret", timeout=60_000)
    expect(page.locator("#ferret_image canvas").first).to_be_visible()
    time.sleep(settle)


def upload_and_draw_a_box(page, picture, settle: float) -> bool:
    """Upload ``picture``, wait for the editor to show it enlarged, draw a diagonal stroke in Box mode and add it.

    True once "[region0]" is in the Referring Input Cache."""
    from playwright.sync_api import expect

    page.locator("#ferret_image input[type=file]").set_input_files(str(picture))
    # the upload handler answers with the picture upscaled for display, and an empty preview for it
    expect(page.locator("#region_preview img")).to_be_visible(timeout=60_000)
    page.locator("#refer_type").get_by_label("Box").check()
    # The editor re-renders with the upscaled picture after the upload handler answers; a stroke drawn while it
    # does is lost. So draw, add, and draw again (a bounded number of times) until the region registers.
    for _ in range(3):
        time.sleep(settle)
        box = page.locator("#ferret_image canvas").first.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx - 40, cy - 30)
        page.mouse.down()
        for step in range(1, 9):  # a short diagonal stroke: its bounding box is the referring box
            page.mouse.move(cx - 40 + 5 * step, cy - 30 + 4 * step)
        page.mouse.up()
        page.locator("#add_region").click()
        try:
            expect(page.locator("#region_cache")).to_contain_text("[region0]", timeout=10_000)
            return True
        except AssertionError:
            continue
    return False


def test_clear_upload_draw_ask_on_a_small_image(stack, tmp_path):
    """Clear -> upload a 56 px picture -> draw a box -> ask -> answer and output drawn; Clear again empties the
    page, and the editor takes the next picture."""
    from playwright.sync_api import expect, sync_playwright

    picture = tmp_path / "picture.png"
    image = Image.new("RGB", (56, 56), (30, 120, 200))
    ImageDraw.Draw(image).ellipse([14, 10, 40, 36], fill=(230, 40, 40))
    image.save(picture)
    with sync_playwright() as playwright:
        # playwright gives the browser a fresh temporary profile of its own
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            # Gradio's image editor sets itself up asynchronously after the page loads; a picture handed to it
            # before that is shown but never enters its value (a frontend race). So wait for its canvas before
            # uploading, and start over on a fresh page (a bounded number of times) when the region does not
            # register.
            for attempt in range(3):
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                open_demo(page, stack["url"], settle=1.0 + 2 * attempt)
                page.locator("#clear").click()  # Clear on a fresh page must not break the editor
                time.sleep(1.0)
                if upload_and_draw_a_box(page, picture, settle=1.0 + 2 * attempt):
                    break
                page.close()
            else:
                pytest.fail("the drawn box never reached the Referring Input Cache (3 fresh pages)")
            textbox = page.locator("#input_text textarea")
            expect(textbox).to_have_value("[region0]")
            textbox.fill("What is [region0]?")
            page.locator("#send").click()

            expect(page.locator("#output_vis img")).to_be_visible(timeout=120_000)
            chat = page.locator("#chatbot")
            expect(chat).to_contain_text("What is [region0]?")
            answer = page.locator("#chatbot .bot, #chatbot [data-testid='bot']").last
            expect(answer).to_be_visible()
            assert "▌" not in chat.inner_text()  # streaming finished

            page.locator("#clear").click()
            expect(page.locator("#output_vis img")).to_have_count(0)
            expect(page.locator("#region_preview img")).to_have_count(0)
            expect(chat).not_to_contain_text("What is [region0]?")
            expect(page.locator("#region_cache")).not_to_contain_text("[region0]")
            # the editor is usable again: a new upload and stroke give a new [region0]
            assert upload_and_draw_a_box(page, picture, settle=2.0), "the editor did not recover after Clear"
        finally:
            browser.close()

    (log_file,) = (stack["root"] / "conv_logs").glob("*-conv.json")
    record = json.loads(log_file.read_text().splitlines()[-1])
    assert record["type"] == "chat" and record["model"] == "tiny-ferret"
    assert record["finish"] >= record["start"]
    (region,) = record["regions"]
    # in pixels of the 56 px picture, not of its 448 px display copy
    assert region["type"] == "box" and 0 <= region["x1"] < region["x2"] <= 55 and 0 <= region["y1"] < region["y2"] <= 55
    assert region["x2"] - region["x1"] < 20  # a 40 px stroke on the 8x display is ~5 px of the picture
    text, image = record["messages"][0]["content"]  # the structured request the UI sent
    assert text["text"].count("<region0>") == 1 and image == {"type": "image_url", "image_url": {"url": "<image>"}}
    assert record["messages"][0]["regions"][0]["type"] == "box"
