"""The demo page at `/` in real headless Chromium: pick or drop an image, see the top predictions drawn as bars."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import pytest

from tests.gateway_models import color_image, write_colors_model
from tests.support import path_prefix_proxy, running_gateway

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


@pytest.fixture
def browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium and chromedriver are not installed (run `make browser`)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, where CSP reports
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def gateway_url(tmp_path):
    repository = tmp_path / "repository"
    write_colors_model(repository)
    with running_gateway("--repository", str(repository), log_path=tmp_path / "gateway.log") as (url, _):
        yield url


def choose(browser, path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "file").send_keys(str(path))


DROP_SCRIPT = """
const [base64, name] = arguments;
const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, { type: "image/png" }));
document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
"""


def drop_image(browser, data: bytes, name: str) -> None:
    browser.execute_script(DROP_SCRIPT, base64.b64encode(data).decode(), name)


def test_pick_an_image_and_see_the_top_classes(browser, gateway_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(gateway_url + "/")
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Ready"))
    assert "colors" in browser.find_element(By.ID, "model").text

    photo = tmp_path / "blue.png"
    photo.write_bytes(color_image("blue", fmt="PNG"))
    choose(browser, photo)
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#predictions li")) == 3)
    rows = browser.find_elements(By.CSS_SELECTOR, "#predictions li")
    assert [row.find_element(By.CLASS_NAME, "label").text for row in rows][0] == "blue"
    widths = [row.find_element(By.CSS_SELECTOR, ".bar span").size["width"] for row in rows]
    assert widths[0] > 50 and widths[0] > 10 * max(widths[1], 1)  # the bar shows the score
    assert rows[0].find_element(By.CLASS_NAME, "score").text.startswith("100")
    assert "colors v1" in browser.find_element(By.ID, "status").text
    assert (
        browser.execute_script("return document.getElementById('preview').naturalWidth") > 0
    )  # blob: allowed

    drop_image(browser, color_image("red", fmt="PNG"), "red.png")  # drag and drop takes the same path
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#predictions li .label").text == "red")

    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not a picture")
    choose(browser, junk)
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "invalid_image"))
    status = browser.find_element(By.ID, "status")
    assert "error" in status.get_attribute("class")
    # quoted for the operator, who finds the request in the gateway's logs by it
    assert re.search(r"\(request ID [0-9a-f]{32}\)$", status.text), status.text
    # the page's Content-Security-Policy allows all it does, and the page can run nothing it did not bring
    console = [entry["message"] for entry in browser.get_log("browser")]
    assert not [line for line in console if "Content Security Policy" in line], console
    injected = "const s = document.createElement('script'); s.textContent = 'window.ran = 1'; document.body.append(s)"
    browser.execute_script(injected)
    assert browser.execute_script("return window.ran") is None


def test_the_page_works_behind_a_reverse_proxy_under_a_path_prefix(browser, gateway_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    with path_prefix_proxy(gateway_url, "/resnet") as proxy:
        browser.get(f"{proxy}/resnet/")  # its script, styles and API calls must all go through /resnet/
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Ready"))
        photo = tmp_path / "green.png"
        photo.write_bytes(color_image("green", fmt="PNG"))
        choose(browser, photo)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#predictions li .label"))
        assert browser.find_element(By.CSS_SELECTOR, "#predictions li .label").text == "green"
        background = browser.find_element(By.TAG_NAME, "body").value_of_css_property("background-color")
        assert (
            background == "rgba(246, 247, 249, 1)"
        )  # style.css's: the stylesheet came through the prefix too
