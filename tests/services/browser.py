"""Headless Chromium for the browser tests: Debian's ``chromium`` and ``chromium-driver`` driven by
Selenium, with the flags that keep it off the network, a fresh profile per browser, and keyboard
helpers. ``scripts/test.sh`` installs the packages (and axe-core, from npm, into a cache keyed by
its version) through ``scripts/browser-deps.sh``. Without them the browser tests are skipped, unless RLHF_TEST_REQUIRE_BROWSER=1 (set
by scripts/test.sh), which makes a missing browser a failure. ``scripts/browser-deps.sh`` installs
what is missing.

Screenshots go to ``$RLHF_TEST_ARTIFACTS/labeling`` (default ``.cache/test-artifacts/labeling``);
the test run prints the directory at its end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("RLHF_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RLHF_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlhf"
# scripts/browser-deps.sh installs axe-core (its version is set there) and scripts/test.sh passes the path
AXE_JS = Path(os.environ.get("RLHF_AXE_JS") or max(
    _CACHE.glob("axe-core-*/axe.min.js"), default=_CACHE / "axe-core",
    key=lambda p: [int(x) for x in p.parent.name.rpartition("-")[2].split(".") if x.isdigit()]))
# the machine's Chromium otherwise tries to reach the network (updates, sync, field trials, QUIC probes)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1100"]
REQUIRED = os.environ.get("RLHF_TEST_REQUIRE_BROWSER") == "1"
SAVED: list[Path] = []  # screenshots of this run (tests/services/conftest.py prints where they are)


def artifacts_dir() -> Path:
    d = Path(os.environ.get("RLHF_TEST_ARTIFACTS") or ROOT / ".cache" / "test-artifacts") / "labeling"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _missing() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package (pip install -e '.[test]')"
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} (apt-get install {pkg})"
    return ""


def require_browser() -> None:
    missing = _missing()
    if missing:
        if REQUIRED:
            pytest.fail(f"the browser tests need {missing}; scripts/test.sh installs it")
        pytest.skip(f"needs {missing}")


def axe_source() -> str:
    if not AXE_JS.is_file():
        if REQUIRED:
            pytest.fail(f"axe-core is not at {AXE_JS}; scripts/browser-deps.sh installs it from npm")
        pytest.skip(f"needs axe-core at {AXE_JS} (scripts/browser-deps.sh installs it)")
    return AXE_JS.read_text()


class Browser:
    """One headless Chromium with a profile of its own (removed at close)."""

    def __init__(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
        self.profile = tempfile.mkdtemp(prefix="rlhf-chromium-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for f in [*FLAGS, f"--user-data-dir={self.profile}"]:
            opts.add_argument(f)
        self.driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
        self.driver.set_script_timeout(60)

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    # -- keyboard -----------------------------------------------------------------------------------
    def press(self, *keys: str) -> None:
        """Send keys to whatever has the focus, as a person at the keyboard would."""
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).send_keys(*keys).perform()

    def chord(self, modifier: str, key: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).key_down(modifier).send_keys(key).key_up(modifier).perform()

    def active(self, js_predicate: str) -> bool:
        """Whether the focused element ``e`` satisfies the JavaScript expression ``js_predicate``."""
        return bool(self.driver.execute_script(f"const e = document.activeElement; return !!({js_predicate});"))

    def tab_to(self, js_predicate: str, limit: int = 80) -> None:
        """Press Tab until the focused element satisfies ``js_predicate``."""
        for _ in range(limit):
            if self.active(js_predicate):
                return
            self.press("\ue004")  # Tab
        raise AssertionError(f"Tab never reached an element where {js_predicate}")

    # -- pages --------------------------------------------------------------------------------------
    def wait(self, js_condition: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.driver.execute_script(f"return ({js_condition});")
            if v:
                return v
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {js_condition}; page: "
                             + self.driver.execute_script("return document.body.innerText;")[:1500])

    def sign_in(self, base_url: str, token: str) -> None:
        """Sign in with the keyboard: the token typed into the form, Enter."""
        self.driver.delete_all_cookies()
        self.driver.get(base_url + "/login")
        self.wait("document.activeElement && document.activeElement.id === 'token'")  # autofocus
        self.press(token, "\ue007")  # Enter
        self.wait("!location.pathname.startsWith('/login') && document.getElementById('who') !== null"
                  " ? document.getElementById('who').textContent.startsWith('Signed in') : false")

    def fetch(self, method: str, path: str, body: dict | None = None) -> dict:
        """A request from the page itself (its cookies, its CSRF token): {status, body}."""
        return self.driver.execute_async_script("""
            const [method, path, body, done] = arguments;
            (async () => {
              const s = await (await fetch('/api/session')).json();
              const opts = {method, headers: {'X-CSRF-Token': s.csrf_token}};
              if (body !== null) { opts.headers['Content-Type'] = 'application/json'; opts.body = JSON.stringify(body); }
              const r = await fetch(path, opts);
              let data = null;
              try { data = await r.json(); } catch (e) {}
              done({status: r.status, body: data});
            })().catch((e) => done({status: -1, body: String(e)}));
        """, method, path, body)

    def screenshot(self, name: str) -> Path:
        path = artifacts_dir() / name
        self.driver.save_screenshot(str(path))
        SAVED.append(path)
        return path

    def axe(self, source: str) -> list[dict]:
        """axe-core's violations of the page (axe injected through the driver, as the CSP refuses
        inline script)."""
        if not self.driver.execute_script("return !!window.axe;"):
            self.driver.execute_script(source)
        return self.driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            axe.run(document, {resultTypes: ['violations']}).then((r) => done(r.violations.map((v) => ({
              id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map((n) => n.target.join(' ')).slice(0, 5)}))))
              .catch((e) => done([{id: 'axe-error', impact: 'critical', help: String(e), nodes: []}]));
        """)
