"""Drive the `hotswapctl ui` dashboard in Debian's headless chromium through
chromium-driver (tests/tests/ui.rs runs this with the selenium virtualenv
that scripts/ci-deps.sh installs under target/).

    dashboard.py fleet URL FILTER NODE...    the fleet page lists the nodes;
                                             FILTER typed in its filter box
    dashboard.py live URL ID [SCREENSHOT]    a canary's page goes from wave 1
                                             to wave 2 by itself, no reload
                                             (prints "ready" once it shows
                                             wave 1, then waits)
    dashboard.py viewer URL ID               the page shows no controls
    dashboard.py approve URL ID REASON       approve through the page

URL is the one the dashboard printed (with its token). Each command prints
one JSON object on stdout (its last line) and exits non-zero with a message when a check
fails.
"""

import json
import sys
import time
from urllib.parse import urlsplit

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

PATIENCE = 60


def browser(width=1280, height=900):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


def origin(url):
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def login(driver, url, path):
    """Visit the printed URL (token traded for the cookie), then `path`."""
    driver.get(url)
    if "token=" in driver.current_url:
        fail(f"the token stayed in the address bar: {driver.current_url}")
    driver.get(origin(url) + path)


def wait_for(driver, what, check):
    try:
        return WebDriverWait(driver, PATIENCE, poll_frequency=0.05).until(lambda d: check(d))
    except Exception as e:
        fail(f"timed out waiting for {what}: {e}; page: {driver.page_source[:4000]}")


def nodes_shown(driver, only_visible=False):
    # Read in one script: live patches replace the rows at any time, so
    # element handles would go stale between calls.
    return driver.execute_script(
        "var visible = arguments[0];"
        "return Array.from(document.querySelectorAll('#fleet-rows tr[data-node]'))"
        ".filter(function (r) { return !visible || !r.hidden; })"
        ".map(function (r) { return r.getAttribute('data-node'); });",
        only_visible,
    )


def attribute(driver, element_id, name):
    return driver.execute_script(
        "var e = document.getElementById(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
        element_id,
        name,
    )


def fleet(url, words, names):
    with browser() as driver:
        login(driver, url, "/")
        shown = wait_for(
            driver,
            f"nodes {names}",
            lambda d: (lambda rows: rows if all(n in rows for n in names) else None)(nodes_shown(d)),
        )
        # The filter box narrows the table to matching rows.
        box = driver.find_element(By.ID, "filter")
        label = driver.find_element(By.CSS_SELECTOR, "label[for=filter]")
        box.send_keys(words)
        visible = nodes_shown(driver, only_visible=True)
        print(json.dumps({"nodes": shown, "filtered": visible, "label": label.text}))


def live(url, deployment, screenshot=None):
    with browser() as driver:
        login(driver, url, f"/deployments/{deployment}")
        wave = attribute(driver, "wave", "data-wave")
        if wave != "1":
            fail(f"the page opened at wave {wave}, not 1: the canary moved too fast for this check")
        controls = driver.execute_script(
            "return Array.from(document.querySelectorAll('[data-action]')).map(function (e) { return e.getAttribute('data-action'); });"
        )
        # A marker that a reload would lose.
        driver.execute_script("window.hotswapMarker = 'still here';")
        # Tell the test the page is on wave 1: it promotes the canary now.
        print("ready", flush=True)
        started = time.time()
        wait_for(
            driver,
            "wave 2",
            lambda d: attribute(d, "wave", "data-wave") == "2",
        )
        seconds = time.time() - started
        marker = driver.execute_script("return window.hotswapMarker || null;")
        if marker != "still here":
            fail("the page was reloaded")
        # Wait for the step-1 verdict to be drawn, for the screenshot.
        wait_for(
            driver,
            "a verdict on traffic",
            lambda d: d.execute_script(
                "return Array.from(document.querySelectorAll('#verdicts tr')).some(function (r) { return r.textContent.indexOf('passed') >= 0; });"
            ),
        )
        verdicts = driver.execute_script(
            "return Array.from(document.querySelectorAll('#verdicts tr')).map(function (r) { return r.textContent; });"
        )
        charts = driver.execute_script(
            "return {canary: document.querySelectorAll('svg.chart polyline.canary').length,"
            " baseline: document.querySelectorAll('svg.chart polyline.baseline').length,"
            " thresholds: document.querySelectorAll('svg.chart .threshold').length};"
        )
        latencies = driver.execute_script("return window.hotswapLatencies;")
        patches = driver.execute_script("return window.hotswapPatches;")
        status = driver.find_element(By.ID, "live-status").text
        timeline = len(driver.find_elements(By.CSS_SELECTOR, "#timeline li"))
        if screenshot:
            driver.set_window_size(1280, 1300)
            driver.save_screenshot(screenshot)
        print(
            json.dumps(
                {
                    "controls": controls,
                    "seconds_to_wave_2": seconds,
                    "latencies_ms": latencies,
                    "patches": patches,
                    "status": status,
                    "timeline": timeline,
                    "verdicts": verdicts,
                    "charts": charts,
                }
            )
        )


def viewer(url, deployment):
    with browser(390, 844) as driver:
        login(driver, url, f"/deployments/{deployment}")
        wait_for(driver, "the live stream", lambda d: d.find_element(By.ID, "live-status").text == "live")
        controls = driver.execute_script(
            "return document.querySelectorAll('[data-action], .controls, form').length;"
        )
        state = attribute(driver, "state", "data-state")
        role = driver.find_element(By.CSS_SELECTOR, ".role").text
        print(json.dumps({"controls": controls, "state": state, "role": role}))


def approve(url, deployment, reason):
    with browser() as driver:
        login(driver, url, f"/deployments/{deployment}")
        # The control sits in the live part of the page, which a patch may
        # replace between finding it and clicking it: find it again then.
        for attempt in range(5):
            button = wait_for(
                driver,
                "the approve control",
                lambda d: d.find_elements(By.CSS_SELECTOR, "[data-action=approve]"),
            )[0]
            try:
                button.click()
                break
            except StaleElementReferenceException:
                continue
        # The confirmation step: a reason box and a confirm button.
        box = wait_for(driver, "the reason box", lambda d: d.find_elements(By.ID, "reason"))[0]
        label = driver.find_element(By.CSS_SELECTOR, "label[for=reason]").text
        box.send_keys(reason)
        driver.find_element(By.ID, "confirm").click()
        wait_for(
            driver,
            "the deployment page after approval",
            lambda d: d.current_url.endswith(f"/deployments/{deployment}")
            and attribute(d, "state", "data-state") not in (None, "awaiting_approval"),
        )
        state = attribute(driver, "state", "data-state")
        print(json.dumps({"state": state, "label": label}))


def main():
    if len(sys.argv) < 3:
        fail(__doc__)
    command, url, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    if command == "fleet":
        fleet(url, rest[0], rest[1:])
    elif command == "live":
        live(url, rest[0], rest[1] if len(rest) > 1 else None)
    elif command == "viewer":
        viewer(url, rest[0])
    elif command == "approve":
        approve(url, rest[0], rest[1])
    else:
        fail(__doc__)


if __name__ == "__main__":
    main()
