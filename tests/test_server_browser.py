"""The web page in a real headless browser (Debian's chromium and chromedriver; .ci/run installs them)."""

import io
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
webdriver = pytest.importorskip("selenium.webdriver")

from PIL import Image  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from llada2uni import LLaDA2Uni  # noqa: E402
from llada2uni.server import ServerConfig, create_app  # noqa: E402
from llada2uni.server.background import serve_in_thread  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,2000"]


@pytest.fixture(scope="module")
def site(tiny_dir):
    pipe = LLaDA2Uni.from_pretrained(tiny_dir, device="cpu")
    with serve_in_thread(create_app(ServerConfig(), pipe=pipe)) as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def fill(driver, element_id: str, text: str) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(text)


def result_image_width(driver, out_id: str):
    """naturalWidth of the page's result image once it has loaded, else None."""
    return driver.execute_script(
        "const img = document.querySelector('#' + arguments[0] + ' img');"
        "return img && img.complete && img.src.startsWith('data:image/png') ? img.naturalWidth : null;", out_id)


def test_prompt_to_image_ask_and_edit(site, browser, tmp_path):
    browser.get(site + "/")
    wait = WebDriverWait(browser, 90)
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("ready"))

    # text to image: type a prompt, press the button, see the image appear
    fill(browser, "t2i-prompt", "a red fox in the snow")
    for field, value in (("t2i-width", "64"), ("t2i-height", "64"), ("t2i-steps", "2")):
        fill(browser, field, value)
    browser.find_element(By.ID, "t2i-go").click()
    wait.until(lambda d: result_image_width(d, "t2i-out") or d.find_element(By.ID, "t2i-error").text)
    assert browser.find_element(By.ID, "t2i-error").text == ""
    assert result_image_width(browser, "t2i-out") == 64
    assert browser.find_element(By.ID, "t2i-progress").get_attribute("value") == "1"

    picture = tmp_path / "photo.png"
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (20, 120, 200)).save(buf, format="PNG")
    picture.write_bytes(buf.getvalue())

    # upload an image and ask about it: the answer streams in
    browser.find_element(By.ID, "ask-file").send_keys(str(picture))
    fill(browser, "ask-question", "What colour is this?")
    fill(browser, "ask-max", "40")
    browser.find_element(By.ID, "ask-go").click()
    wait.until(lambda d: d.find_element(By.ID, "ask-answer").get_attribute("data-done") == "1"
               or d.find_element(By.ID, "ask-error").text)
    assert browser.find_element(By.ID, "ask-error").text == ""

    # edit it with an instruction
    browser.find_element(By.ID, "edit-file").send_keys(str(picture))
    fill(browser, "edit-prompt", "make it green")
    fill(browser, "edit-size", "64x64")
    fill(browser, "edit-steps", "1")
    browser.find_element(By.ID, "edit-go").click()
    wait.until(lambda d: result_image_width(d, "edit-out") or d.find_element(By.ID, "edit-error").text)
    assert browser.find_element(By.ID, "edit-error").text == ""
    assert result_image_width(browser, "edit-out") == 64


def test_errors_are_shown(site, browser):
    browser.get(site + "/")
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("ready"))
    fill(browser, "t2i-prompt", "a fox")
    fill(browser, "t2i-width", "100")
    browser.find_element(By.ID, "t2i-go").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "t2i-error").text)
    assert "multiples of 32" in browser.find_element(By.ID, "t2i-error").text
