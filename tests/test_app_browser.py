"""End to end: the real Streamlit server on localhost, driven by headless Chromium (Debian's, via Selenium and
/usr/bin/chromedriver), uploads a real slice from the dev archive and sees the overlay and the verdict.
The screenshot lands in artifacts/app_browser.png."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile

import pytest
import tifffile

from stages.common import ROOT
from test_app import APP, bright_model

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1100")
ARTIFACTS = ROOT / "artifacts"
START_TIMEOUT, PAGE_TIMEOUT = 90, 180  # seconds; the first prediction imports TensorFlow on 2 cores


@pytest.fixture(scope="module")
def browser_tools():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium Python package")
    if missing:
        reason = f"browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver; pip selenium)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, log, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"streamlit exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"streamlit not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def server(tmp_path):
    """The app as a user starts it (plus a free port and a models folder), stopped whatever happens."""
    models = tmp_path / "models"
    models.mkdir()
    bright_model(models / "bright.keras")
    port = free_port()
    log = tmp_path / "streamlit.log"
    env = {**os.environ, "BRAINSEG_MODELS_DIR": str(models), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.maxUploadSize", "10", "--server.fileWatcherType", "none",
             "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer",
             "--client.showErrorDetails", "type"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, START_TIMEOUT)
        yield url, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: this stops the server and nothing else
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@pytest.fixture
def chrome(browser_tools, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tmp_path / 'chromium-profile'}",):
        options.add_argument(flag)
    # explicit driver and browser paths: Selenium Manager never tries to download either
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def tumour_slice(dev_zip, dest):
    """The first slice (in name order) of the dev archive whose mask shows a sizeable tumour, as a file."""
    with zipfile.ZipFile(dev_zip) as zf:
        for name in sorted(n for n in zf.namelist() if n.endswith("_mask.tif")):
            if (tifffile.imread(zf.open(name)) > 0).sum() > 800:
                image = name.replace("_mask.tif", ".tif")
                path = dest / image.split("/")[-1]
                path.write_bytes(zf.read(image))
                return path
    pytest.fail(f"{dev_zip}: no tumour slice found")


def test_upload_in_a_real_browser_shows_overlay_and_verdict(dev_zip, tmp_path, server, chrome):
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, log = server
    slice_path = tumour_slice(dev_zip, tmp_path)
    started = time.monotonic()
    chrome.get(url)
    wait = WebDriverWait(chrome, PAGE_TIMEOUT)
    upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
    upload.send_keys(str(slice_path))

    alert = wait.until(ec.visibility_of_element_located(
        (By.XPATH, "//*[@data-testid='stAlert'][contains(., 'Tumour present') or contains(., 'No tumour found')]")))
    wait.until(ec.visibility_of_element_located(
        (By.XPATH, "//*[contains(text(), 'Predicted tumour (red outline)')]")))

    def rendered(driver):
        return [img for img in driver.find_elements(By.CSS_SELECTOR, "[data-testid='stImage'] img")
                if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)]

    # the caption can be shown before the browser has decoded both pictures (seen on a loaded machine), so wait
    # for them, up to the same limit, instead of counting at once
    try:
        WebDriverWait(chrome, PAGE_TIMEOUT, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda driver: len(rendered(driver)) >= 2)
    except TimeoutException:
        pass  # the assertion below says what was there
    assert len(rendered(chrome)) == 2, "input and overlay images rendered"
    assert chrome.find_element(By.XPATH, f"//*[contains(text(), '{slice_path.name}')]")
    assert "Traceback" not in chrome.page_source
    ARTIFACTS.mkdir(exist_ok=True)
    chrome.save_screenshot(str(ARTIFACTS / "app_browser.png"))
    print(f"verdict: {alert.text!r}; upload to verdict {time.monotonic() - started:.1f}s; "
          f"screenshot {ARTIFACTS / 'app_browser.png'}")
    assert "Traceback" not in log.read_text()
