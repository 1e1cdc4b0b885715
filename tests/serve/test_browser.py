"""The chat page in a real headless Chromium against `vlmkit serve` started as a user starts it (a subprocess,
with an API key): the key prompt, picking an image, two streamed turns whose answers equal the library's,
boxes drawn on the image, and a screenshot (`$VLMKIT_SCREENSHOT_DIR`, else the test's temp dir)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser import ask, browser_paths, open_browser, start_server, upload, wait_for
from live import free_port

_, _, WHY_NOT = browser_paths()
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)


@pytest.fixture(scope="module")
def run_dir(served_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("served") / "tiny-run"
    served_model.save_pretrained(path / "model")
    return path


def test_chat_page_in_chromium(run_dir, served_model, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    from vlmkit.infer.chat import answer, first_user_turn
    from vlmkit.infer.generate import GenerationConfig

    image_path = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (220, 30, 30)).save(image_path)
    prompt = served_model.config.answer_prompt
    assert prompt  # the page appends it while "short answer" is ticked
    port = free_port()
    server = start_server(run_dir, port, "--api-key", "sekret", "--max-tokens", "12")
    driver = open_browser()
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        # /v1 needs the key: the page says so and shows the key field
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"), 30, "the 401 message")
        assert "API key" in driver.find_element(By.CSS_SELECTOR, ".msg.error").text
        key = driver.find_element(By.ID, "api-key")
        assert key.is_displayed()
        key.send_keys("sekret")
        driver.find_element(By.ID, "question").click()  # leaving the field fires `change`
        wait_for(driver, lambda d: "tiny-run" in d.find_element(By.ID, "model-info").text, 30, "the model card")
        assert "llava-1.5" in driver.find_element(By.ID, "model-info").text

        upload(driver, image_path)
        first = ask(driver, "what color is the shape?")
        second = ask(driver, "and its shape?")

        config = GenerationConfig(max_new_tokens=12)
        image = Image.open(image_path).convert("RGB")
        turns = [{"role": "user", "content": f"<image>\nwhat color is the shape?\n{prompt}"}]
        expected_first = answer(served_model, turns, [image], config)
        turns += [{"role": "assistant", "content": expected_first or "…"},
                  {"role": "user", "content": f"and its shape?\n{prompt}"}]
        expected_second = answer(served_model, turns, [image], config)
        assert (first, second) == (expected_first or "(empty answer)", expected_second or "(empty answer)")
        assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
        assert "prompt +" in driver.find_element(By.ID, "status").text  # usage of the streamed answer

        # boxes in the three formats of the grounding presets, as fractions of the image
        boxes = driver.execute_script(
            "return window.vlmkit.parseBoxes(arguments[0])",
            "<ref>the cat</ref><box>(100,200),(500,600)</box> and {<10><20><50><60>} and [0.1, 0.2, 0.5, 0.6]")
        assert [[round(v, 3) for v in box] for box in boxes] == [[0.1, 0.2, 0.5, 0.6]] * 3
        assert driver.execute_script("return window.vlmkit.drawBoxes('<box>(250,250),(750,750)</box>')") == 1
        edge, centre = driver.execute_script("""
            const c = document.getElementById('boxes'), ctx = c.getContext('2d');
            const px = (x, y) => Array.from(ctx.getImageData(Math.round(x * c.width), Math.round(y * c.height), 1, 1).data);
            return [px(0.25, 0.5), px(0.5, 0.5)];""")
        assert edge[:2] == [255, 214] and edge[3] == 255 and centre[3] == 0  # a yellow outline, nothing inside

        shots = Path(os.environ.get("VLMKIT_SCREENSHOT_DIR", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        shot = shots / "chat-page.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

        # two images picked at once: a new conversation; the page sends both before the question and the server
        # numbers them as `vlmkit chat` does, so the answer is the library's for the same two images
        blue = tmp_path / "blue.png"
        Image.new("RGB", (40, 64), (30, 60, 220)).save(blue)
        driver.find_element(By.ID, "file-input").send_keys(f"{image_path.resolve()}\n{blue.resolve()}")
        wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img")) == 2, 30, "two thumbnails")
        both = ask(driver, "are they the same colour?")
        expected = answer(served_model, [{"role": "user", "content": first_user_turn(
            f"are they the same colour?\n{prompt}", 2)}], [image, Image.open(blue).convert("RGB")], config)
        assert both == (expected or "(empty answer)")
        assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user")) == 1  # a new conversation
        assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user img")) == 2
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)
