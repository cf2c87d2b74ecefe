"""Headless Chromium (Debian's package) driven over its DevTools protocol, for the UI tests.

No browser download and no browser-automation package: Chromium listens on a local DevTools
port, and aiohttp (already installed with ``ray[default]``) speaks the protocol's websocket. The
flags keep Chromium off the network (this machine's is closed) and out of the user's profile.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1600,1000"]


def chromium() -> str | None:
    """Chromium's path, or None when it is not installed (``make chromium`` installs it)."""
    return CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")


class Browser:
    """One headless Chromium with one page; synchronous calls for tests.

    Args:
        profile: an empty directory for Chromium's user data (it writes its DevTools port there).
    """

    def __init__(self, profile: Path, timeout: float = 60.0) -> None:
        self.process = subprocess.Popen(
            [chromium() or CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.loop = asyncio.new_event_loop()
        self.ids = itertools.count(1)
        try:
            port = self._devtools_port(profile / "DevToolsActivePort", timeout)
            self.loop.run_until_complete(self._connect(port))
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, path: Path, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}")
            lines = path.read_text().splitlines() if path.exists() else []
            if lines and lines[0].strip().isdigit():
                return int(lines[0])
            time.sleep(0.1)
        raise TimeoutError(f"chromium wrote no {path} in {timeout} s")

    async def _connect(self, port: int) -> None:
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as response:
            pages = [t for t in await response.json() if t["type"] == "page"]
        self.socket = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"],
                                                    max_msg_size=0)

    async def _call(self, method: str, params: dict) -> dict:
        call_id = next(self.ids)
        await self.socket.send_str(json.dumps({"id": call_id, "method": method,
                                               "params": params}))
        while True:  # events arrive in between; only the answer to this call matters
            message = json.loads((await self.socket.receive()).data)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def call(self, method: str, **params) -> dict:
        """One DevTools command, e.g. ``call("Page.navigate", url=...)``."""
        return self.loop.run_until_complete(self._call(method, params))

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float = 60.0):
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.5)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.loop.run_until_complete(self.socket.close())
        if getattr(self, "session", None) is not None:
            self.loop.run_until_complete(self.session.close())
        self.loop.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
