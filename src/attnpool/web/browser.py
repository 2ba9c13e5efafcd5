"""A small headless-Chromium driver over the Chrome DevTools Protocol, for the page's browser test and screenshot.

It drives the system's Chromium (Debian's ``chromium``; nothing is downloaded) through one page's DevTools websocket
(``websocket-client``): navigate, click, type with real key events, evaluate JavaScript, take a PNG screenshot, and
collect every console error, uncaught exception and failed resource load the page produced.

    with Chromium() as browser:
        browser.navigate("http://127.0.0.1:8000/")
        browser.wait_for("document.body.dataset.state === 'ready'")
        browser.click("#query"); browser.type_text("delete a bucket"); browser.press_enter()
        png = browser.screenshot()
        assert browser.console_errors == []
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["BrowserError", "Chromium", "find_chromium"]


class BrowserError(RuntimeError):
    """Chromium did not start, a DevTools call failed, or a wait timed out."""


def find_chromium() -> str | None:
    """The path of the system's Chromium, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """One headless Chromium with one page, in a throwaway profile; a context manager that always ends the browser.

    Args:
        executable: the browser (default: :func:`find_chromium`).
        width, height: the window size in CSS pixels.
        timeout: seconds for start-up and for each DevTools call.
    """

    def __init__(self, executable: str | None = None, *, width: int = 1200, height: int = 900,
                 timeout: float = 60.0) -> None:
        self.executable = executable or find_chromium()
        if not self.executable:
            raise BrowserError("chromium: not found on PATH (Debian: apt-get install chromium)")
        self.width, self.height, self.timeout = width, height, timeout
        self.console_errors: list[str] = []
        self.console_messages: list[str] = []
        self._events: list[dict[str, Any]] = []
        self._next_id = 0
        self._profile = tempfile.mkdtemp(prefix="attnpool-chromium-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: Any = None

    # -- life cycle ------------------------------------------------------------------------------------------------

    def __enter__(self) -> Chromium:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        import websocket  # websocket-client

        args = [self.executable, "--headless=new", "--disable-gpu", "--remote-debugging-port=0",
                f"--user-data-dir={self._profile}", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--hide-scrollbars", "--mute-audio",
                f"--window-size={self.width},{self.height}", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self._log = open(Path(self._profile) / "stderr.log", "wb")  # noqa: SIM115 (closed in close())
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self._log)
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if self._proc.poll() is not None:
                raise BrowserError(f"chromium exited with code {self._proc.returncode} at start-up: "
                                   f"{self._stderr_tail()}")
            if time.monotonic() > deadline:
                raise BrowserError(f"chromium: no DevTools port after {self.timeout:.0f} s: {self._stderr_tail()}")
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout) as r:
            targets = json.load(r)
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise BrowserError(f"chromium: no page target among {targets}")
        # suppress_origin: Chromium rejects DevTools websockets whose Origin it was not told to allow
        self._ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=self.timeout,
                                               suppress_origin=True)
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1,
                  mobile=False)

    def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
            self._ws = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(10)
            self._proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def _stderr_tail(self) -> str:
        try:
            return (Path(self._profile) / "stderr.log").read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    # -- the protocol ----------------------------------------------------------------------------------------------

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result; events that arrive meanwhile are recorded."""
        if self._ws is None:
            raise BrowserError("chromium: not started")
        self._next_id += 1
        mine = self._next_id
        self._ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            message = json.loads(self._ws.recv())
            if message.get("id") == mine:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})  # type: ignore[no-any-return]
            if "method" in message:
                self._event(message)
        raise BrowserError(f"{method}: no answer within {self.timeout:.0f} s")

    def _event(self, message: dict[str, Any]) -> None:
        method, params = message["method"], message.get("params", {})
        self._events.append(message)
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console_messages.append(f"{params.get('type')}: {text}")
            if params.get("type") in ("error", "assert"):
                self.console_errors.append(f"console.{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exc = details.get("exception", {}).get("description") or details.get("text")
            self.console_errors.append(f"uncaught exception: {exc}")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") == "error":
                self.console_errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"evaluate {expression!r}: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float | None = None) -> Any:
        """Poll ``expression`` until it is truthy; its value. Raises :class:`BrowserError` on timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        last_error = ""
        while True:
            try:  # while a page loads, its document may not exist yet: keep polling
                value = self.evaluate(expression)
            except BrowserError as e:
                value, last_error = None, str(e)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"waited {timeout or self.timeout:.0f} s for {expression!r} "
                                   f"({last_error or 'falsy'}); console: {self.console_messages[-5:]}")
            time.sleep(0.05)

    # -- actions ---------------------------------------------------------------------------------------------------

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the middle of the element ``selector``."""
        box = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
                            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                            " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        if not box:
            raise BrowserError(f"click: no element matches {selector!r}")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type_text(self, text: str) -> None:
        """Type ``text`` into the focused element, one key event per character (``\\n`` as the Enter key)."""
        for ch in text:
            if ch == "\n":
                self.press_enter()
                continue
            self.call("Input.dispatchKeyEvent", type="keyDown", key=ch, text=ch, unmodifiedText=ch)
            self.call("Input.dispatchKeyEvent", type="keyUp", key=ch)

    def press_enter(self) -> None:
        keys = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13}
        self.call("Input.dispatchKeyEvent", type="keyDown", text="\r", **keys)
        self.call("Input.dispatchKeyEvent", type="keyUp", **keys)

    def screenshot(self, path: str | os.PathLike[str] | None = None, *, full_page: bool = True) -> bytes:
        """A PNG of the page (the whole scrollable page with ``full_page``); written to ``path`` if given."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1})
        png = base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])
        if path is not None:
            Path(path).write_bytes(png)
        return png
