"""Every kind of report in a real browser: headless Chromium driven by selenium.

Each page is opened from disk with the browser's network switched off (a page that fetched
anything would log an error); a test fails on any message in the browser console, checks the key
numbers are in the DOM where a reader looks, that a header click sorts a table, that dark mode
changes the colours, that a screenshot is not blank, and prints the run page to PDF. CI installs
Debian's ``chromium`` and ``chromium-driver`` (.ci/run); the module is skipped, saying why, only
where they (or selenium) are missing.
"""

import base64
import io
import json
import shutil
import tempfile

import pytest

from tightfit.report import write_report
from tightfit.units import format_bytes

# Debian's packages; chromedriver is the driver of exactly that Chromium
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does it)",
)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install 'tightfit[dev]')"
    )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="tightfit-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1200,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _open(browser, report_sources, kind: str):
    """Write the page of ``kind``, open it, and fail on anything in the console."""
    from selenium.webdriver.common.by import By

    page = write_report(report_sources[kind])
    browser.get_log("browser")  # drop what an earlier page left
    browser.get(page.resolve().as_uri())
    assert browser.find_element(By.CSS_SELECTOR, "main").get_attribute("data-report-kind")
    messages = browser.get_log("browser")
    assert messages == [], f"console messages on the {kind} page: {messages}"
    return page


def _tile(browser, key: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, f'[data-key="{key}"] .value').text


def _assert_not_blank(browser) -> None:
    from PIL import Image, ImageStat

    image = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("L")
    assert image.size[0] >= 800
    assert ImageStat.Stat(image).stddev[0] > 10, "the screenshot is (nearly) one colour"
    assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20


def test_training_run_page(browser, report_sources):
    from selenium.webdriver.common.by import By

    summary = json.loads((report_sources["run"] / "summary.json").read_text())
    _open(browser, report_sources, "run")
    assert _tile(browser, "test_accuracy") == f"{summary['test_accuracy'] * 100:.1f} %"
    assert _tile(browser, "peak_bytes") == format_bytes(summary["peak_memory_bytes"]["process_rss"])
    charts = browser.find_elements(By.CSS_SELECTOR, "svg.chart[role=img]")
    assert {"loss curves", "memory over the run"} <= {chart.get_attribute("aria-label") for chart in charts}
    loss = next(chart for chart in charts if chart.get_attribute("aria-label") == "loss curves")
    assert loss.size["width"] > 300 and loss.size["height"] > 100  # drawn, not collapsed
    _assert_not_blank(browser)
    pdf = base64.b64decode(browser.execute_cdp_cmd("Page.printToPDF", {})["data"])  # what printing the page gives
    assert pdf.startswith(b"%PDF") and len(pdf) > 20_000


def test_plan_page(browser, report_sources):
    plan = json.loads(report_sources["plan"].read_text())
    _open(browser, report_sources, "plan")
    assert _tile(browser, "peak_bytes") == format_bytes(plan["peak_bytes"])
    _assert_not_blank(browser)


def test_pipeline_page(browser, report_sources):
    from selenium.webdriver.common.by import By

    pipeline = json.loads(report_sources["pipeline"].read_text())
    _open(browser, report_sources, "pipeline")
    rows = browser.find_elements(By.CSS_SELECTOR, "#stages tbody tr")
    assert [row.find_element(By.TAG_NAME, "td").text for row in rows] == [stage["name"] for stage in pipeline["stages"]]
    _assert_not_blank(browser)


def test_compression_page_and_sorting(browser, report_sources):
    from selenium.webdriver.common.by import By

    report = json.loads((report_sources["compression"] / "report.json").read_text())
    _open(browser, report_sources, "compression")
    assert _tile(browser, "best_artifact") == report["best"]["fastest"]
    best_row = browser.find_element(By.CSS_SELECTOR, "#artifacts tr.best td")
    assert best_row.text == report["best"]["fastest"]

    def first_column():
        return [
            row.find_element(By.TAG_NAME, "td").text
            for row in browser.find_elements(By.CSS_SELECTOR, "#artifacts tbody tr")
        ]

    latency_header = browser.find_elements(By.CSS_SELECTOR, "#artifacts th")[5]
    assert latency_header.text.startswith("ms @1")
    latency_header.click()
    by_latency = sorted(report["artifacts"], key=lambda artifact: artifact["latency"]["batch_1"]["median_ms"])
    assert first_column() == [artifact["name"] for artifact in by_latency]
    latency_header.click()
    assert first_column() == [artifact["name"] for artifact in reversed(by_latency)]
    assert latency_header.get_attribute("aria-sort") == "descending"
    assert browser.get_log("browser") == []
    _assert_not_blank(browser)


def test_doctor_page_and_dark_mode(browser, report_sources):
    doctor = json.loads(report_sources["doctor"].read_text())
    _open(browser, report_sources, "doctor")
    from selenium.webdriver.common.by import By

    headline = browser.find_element(By.CSS_SELECTOR, ".verdict .headline").text
    assert headline.lower() == doctor["verdict"]["summary"].lower()

    def background() -> str:
        return browser.execute_script("return getComputedStyle(document.body).backgroundColor")

    light = background()
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    try:
        assert background() != light
        _assert_not_blank(browser)
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def test_study_page(browser, report_sources):
    from selenium.webdriver.common.by import By

    statistics = json.loads((report_sources["study"] / "results.json").read_text())["evaluations"]["statistics"]
    _open(browser, report_sources, "study")
    best = max(statistics["table"], key=lambda row: row["accuracy"])
    assert _tile(browser, "best_result") == f"{best['arm']} / {best['classifier']}"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")) == len(statistics["table"])
    _assert_not_blank(browser)
