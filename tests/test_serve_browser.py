"""The page in headless Chromium: it loads, an interaction added through its form shows on the timeline.

A real uvicorn server on a free loopback port serves the tiny run; Chromium is driven over the
DevTools protocol on a pipe (--remote-debugging-pipe: NUL-separated JSON on fds 3 and 4), so no
browser driver package is needed. Skipped where /usr/bin/chromium is missing (Debian: `apt-get
install chromium`). AUTOMR_SCREENSHOT=docs/serve.png also saves the final screenshot there.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import K

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs headless Chromium at /usr/bin/chromium (apt-get install chromium)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--remote-debugging-pipe", "--window-size=1200,900"]


class Browser:
    """Chromium with the DevTools protocol on a pipe: `call(method, **params)` on one page target."""

    def __init__(self, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Above 9, so that moving one onto 3 or 4 never clobbers the other.
        to_chrome_r, from_chrome_w = (_above_nine(fd) for fd in (to_chrome_r, from_chrome_w))
        # The protocol's fds are 3 (commands in) and 4 (replies out): bash moves the pipes there (dash takes single-digit fds only).
        argv = " ".join(shlex.quote(a) for a in [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"])
        self.proc = subprocess.Popen(["bash", "-c", f"exec {argv} 3<&{to_chrome_r} 4>&{from_chrome_w}"],
                                     pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id, self.session = b"", 0, None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buf:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\0")
        return json.loads(line)

    def js(self, expression: str) -> Any:
        got = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in got:
            raise RuntimeError(f"{expression}: {got['exceptionDetails']}")
        return got["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except RuntimeError:
            pass
        self.proc.wait(timeout=10)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def _above_nine(fd: int) -> int:
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tiny_run: Path, tmp_path: Path):
    import uvicorn

    from automr.api import load_run
    from automr.serve.app import create_app

    app = create_app(load_run(tiny_run), tmp_path / "state")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(timeout=30)


def test_the_page_shows_an_interaction_added_through_its_form(server, tmp_path: Path) -> None:
    import httpx

    url, app = server
    titles = app.state.service.run.titles
    for j, item in enumerate([3, 7, 12, 5, 18, 9, 2]):  # a history long enough to have memory (K=4)
        r = httpx.post(f"{url}/users/ada/interactions", params={"wait": True},
                       json={"item_id": item, "time": 1_600_000_000 + 86_400 * j, "event_id": f"seed{j}"})
        assert r.status_code == 201
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"{url}/?user=ada")
        browser.wait_for("document.querySelectorAll('#timeline .ev').length === 7 && document.querySelectorAll('#recs tr').length > 0")
        assert browser.js("document.querySelectorAll('#timeline .ev.memory').length") == 7 - K
        assert browser.js("document.querySelectorAll('#timeline .ev.recent').length") == K
        assert browser.js("document.querySelectorAll('#timeline .ev.retrieved').length") == 1
        new_title = titles[25]
        browser.js(f"document.getElementById('title').value = {json.dumps(new_title)};"
                   "document.getElementById('time').value = '1600700000';"
                   "document.getElementById('add').requestSubmit(); true")
        browser.wait_for("document.querySelectorAll('#timeline .ev').length === 8")
        last = browser.js("Array.from(document.querySelectorAll('#timeline .ev')).pop().firstChild.textContent")
        assert last == new_title
        assert "added " + new_title in browser.js("document.getElementById('status').textContent")
        assert browser.js("document.querySelectorAll('#timeline .ev.memory').length") == 8 - K  # one more left the window
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    finally:
        browser.close()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "serve.png").write_bytes(shot)
    if os.environ.get("AUTOMR_SCREENSHOT"):
        shutil.copyfile(tmp_path / "serve.png", os.environ["AUTOMR_SCREENSHOT"])
    stored = app.state.service.storage
    uid = stored.user("ada")
    assert [e.item_id for e in stored.history(uid)][-1] == 25
