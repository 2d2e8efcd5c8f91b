"""Drive a headless Chromium over the DevTools protocol, for tests.

Usage: cdp.py CHROMIUM URL

Starts CHROMIUM headless with a fresh profile, opens URL, and collects
console errors and uncaught exceptions. Then reads commands, one per line,
from stdin and answers each with one JSON line on stdout:

  eval EXPRESSION     {"value": <the expression's value>} or {"error": ...}
  errors              {"value": [every console error or exception so far]}
  screenshot PATH     {"value": PATH} after writing a PNG of the page
  quit                exits (so does EOF)

The first line on stdout is {"ready": true} once the page has loaded.
Only the standard library is used: the WebSocket client is the few lines
below (text frames, client masking, no extensions).
"""

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


class WebSocket:
    def __init__(self, url):
        m = re.match(r"ws://([^/:]+):(\d+)(/.*)", url)
        host, port, path = m.group(1), int(m.group(2)), m.group(3)
        self.sock = socket.create_connection((host, port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake cut")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head!r}")
        self.sock.settimeout(None)
        self.lock = threading.Lock()

    def send(self, text):
        data = text.encode()
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        with self.lock:
            self.sock.sendall(header + mask + masked)

    def _exact(self, n):
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("websocket closed")
            out += chunk
        return out

    def recv(self):
        message = b""
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._exact(8))[0]
            payload = self._exact(n)
            opcode = b0 & 0x0F
            if opcode == 8:
                raise ConnectionError("websocket closed by the browser")
            if opcode in (9, 10):
                continue  # ping/pong
            message += payload
            if b0 & 0x80:
                return message.decode()


class Page:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.pending = {}
        self.errors = []
        self.loaded = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            try:
                msg = json.loads(self.ws.recv())
            except (ConnectionError, OSError, ValueError):
                for waiter in self.pending.values():
                    waiter["done"].set()
                return
            if "id" in msg and msg["id"] in self.pending:
                waiter = self.pending[msg["id"]]
                waiter["reply"] = msg
                waiter["done"].set()
                continue
            method, params = msg.get("method"), msg.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                args = [a.get("value", a.get("description", "")) for a in params.get("args", [])]
                self.errors.append("console." + params["type"] + ": " + " ".join(map(str, args)))
            elif method == "Runtime.exceptionThrown":
                d = params.get("exceptionDetails", {})
                self.errors.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                e = params["entry"]
                self.errors.append(f"log: {e.get('text', '')} {e.get('url', '')}".strip())
            elif method == "Page.loadEventFired":
                self.loaded.set()

    def call(self, method, params=None, timeout=30):
        self.next_id += 1
        waiter = {"done": threading.Event(), "reply": None}
        self.pending[self.next_id] = waiter
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params or {}}))
        if not waiter["done"].wait(timeout):
            raise TimeoutError(f"{method}: no answer within {timeout}s")
        reply = waiter["reply"]
        if reply is None:
            raise ConnectionError("the browser went away")
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})


def main():
    chromium, url = sys.argv[1], sys.argv[2]
    profile = tempfile.mkdtemp(prefix="gossamer-cdp-")
    browser = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-dev-shm-usage",
         "--window-size=1400,1000", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "about:blank"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        port = None
        deadline = time.time() + 60
        while time.time() < deadline:
            line = browser.stderr.readline()
            if not line:
                break
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                port = int(m.group(1))
                break
        if port is None:
            print(json.dumps({"error": "chromium did not open its DevTools port"}), flush=True)
            return
        threading.Thread(target=lambda: [None for _ in browser.stderr], daemon=True).start()
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page_target = next(t for t in targets if t.get("type") == "page")
        page = Page(WebSocket(page_target["webSocketDebuggerUrl"]))
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            page.call(domain)
        page.call("Page.navigate", {"url": url})
        page.loaded.wait(30)
        print(json.dumps({"ready": page.loaded.is_set()}), flush=True)
        for line in sys.stdin:
            command, _, arg = line.strip().partition(" ")
            try:
                if command == "eval":
                    r = page.call("Runtime.evaluate", {"expression": arg, "returnByValue": True,
                                                       "awaitPromise": True})
                    if "exceptionDetails" in r:
                        out = {"error": r["exceptionDetails"].get("text", "exception")}
                    else:
                        out = {"value": r.get("result", {}).get("value")}
                elif command == "errors":
                    out = {"value": list(page.errors)}
                elif command == "screenshot":
                    r = page.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
                    with open(arg, "wb") as f:
                        f.write(base64.b64decode(r["data"]))
                    out = {"value": arg}
                elif command == "quit":
                    break
                else:
                    out = {"error": f"unknown command {command!r}"}
            except Exception as e:  # reported to the test, which decides
                out = {"error": f"{type(e).__name__}: {e}"}
            print(json.dumps(out), flush=True)
    finally:
        browser.kill()
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
