"""Screenshots of a Label Studio project as a reviewer sees it, in a real headless browser.

Logs in through the login form over the Chrome DevTools protocol (the pages sit behind a login), opens a
page and saves a PNG. Needs ``chromium`` (Debian package) and ``websocket-client`` (pip); neither is a
dependency of freeshap-dq: this is how docs/label-studio-*.png were taken.

Usage:
  python scripts/labelstudio_screenshot.py --url http://127.0.0.1:8080 --email EMAIL --password PASSWORD \\
      --page "/projects/1/data?tab=2&task=5" -o task.png [--wait 8]
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from itertools import count

import websocket


class Browser:
    def __init__(self, width: int, height: int, port: int = 9333):
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            raise SystemExit("chromium is not installed (apt-get install chromium).")
        self.profile = tempfile.mkdtemp(prefix="ls-shot-")
        self.process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
             f"--window-size={width},{height}", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as response:
                    pages = [p for p in json.load(response) if p.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        self.socket = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60)
        self.ids = count(1)
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def send(self, method: str, **params):
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.socket.recv())
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str, wait: float) -> None:
        self.send("Page.navigate", url=url)
        time.sleep(wait)

    def evaluate(self, script: str):
        return self.send("Runtime.evaluate", expression=script, returnByValue=True).get("result", {}).get("value")

    def screenshot(self, path: str) -> None:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(data))

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--email", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--page", action="append", required=True, help="Path to open (repeat with -o).")
    parser.add_argument("-o", "--output", action="append", required=True)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1800)
    parser.add_argument("--wait", type=float, default=8.0)
    args = parser.parse_args()
    browser = Browser(args.width, args.height)
    try:
        browser.open(f"{args.url}/user/login", 3)
        browser.evaluate(f"""(() => {{
            document.querySelector('input[name=email]').value = {json.dumps(args.email)};
            document.querySelector('input[name=password]').value = {json.dumps(args.password)};
            document.querySelector('form').submit(); }})()""")
        time.sleep(3)
        for page, output in zip(args.page, args.output, strict=True):
            browser.open(args.url + page, args.wait)
            browser.screenshot(output)
            print(f"wrote {output}")
    finally:
        browser.close()


if __name__ == "__main__":
    main()
