"""Drive the chat page in a real headless Chromium (selenium + the Debian `chromium`/`chromium-driver`).

Used by test_browser.py, and on its own to take the README's screenshot of a trained run:

    python tests/serve/browser.py runs/demo IMAGE.png "what shape is in the image?" docs/images/chat-page.png
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver",)


def browser_paths() -> tuple[str | None, str | None, str]:
    """(browser binary, driver binary, why not) — the reason is empty when both exist."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, None, "selenium is not installed (pip install -e '.[test]')"
    binary = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    driver = next((p for p in map(shutil.which, DRIVER) if p), None)
    if not binary or not driver:
        return binary, driver, ("no headless browser here: install the Debian packages chromium and "
                                "chromium-driver (.ci/run does, with apt-get)")
    return binary, driver, ""


def start_server(run: str, port: int, *extra: str) -> subprocess.Popen:
    """`vlmkit serve RUN` as a user starts it; returns once /health answers."""
    process = subprocess.Popen([sys.executable, "-m", "vlmkit", "serve", str(run), "--port", str(port),
                                "--log-level", "warning", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vlmkit serve exited with {process.returncode}:\n{process.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"vlmkit serve did not answer /health on port {port} within 120 s")


def open_browser(width: int = 1100, height: int = 720):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver, why = browser_paths()
    if why:
        raise RuntimeError(why)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def wait_for(driver, condition, timeout: float = 60, what: str = "the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition, message=f"timed out waiting for {what}")


def ask(driver, question: str, timeout: float = 120) -> str:
    """Type a question, press Ask, wait until the streamed answer is complete; returns its text."""
    from selenium.webdriver.common.by import By

    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "send").click()

    def answered(d):
        bubbles = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        errors = d.find_elements(By.CSS_SELECTOR, ".msg.error")
        if errors:
            raise AssertionError(f"the page shows an error: {errors[-1].text}")
        done = len(bubbles) > before and "streaming" not in bubbles[-1].get_attribute("class")
        return bubbles[-1].text if done else False

    return wait_for(driver, answered, timeout, f"the answer to {question!r}")


def upload(driver, image: str | os.PathLike) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "file-input").send_keys(str(Path(image).resolve()))
    wait_for(driver, lambda d: "shown" in d.find_element(By.ID, "image-wrap").get_attribute("class"), 30,
             "the image preview")


def main(argv: list[str]) -> int:
    run, image, question, out = argv
    port = 8765
    server = start_server(run, port)
    driver = open_browser()
    try:
        from selenium.webdriver.common.by import By

        driver.get(f"http://127.0.0.1:{port}/")
        wait_for(driver, lambda d: "context" in d.find_element(By.ID, "model-info").text, 30, "the model card")
        upload(driver, image)
        for q in question.split("|"):
            print(f"{q!r} -> {ask(driver, q)!r}")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(out)
        print(f"screenshot {out}")
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
