"""Check the HTML reports in headless chromium: ``python tests/browser.py reports``.

``check_reports`` lists problems (pages that fail to load, broken images or links, external
requests, console errors, crashed notebooks); chromium runs over the DevTools pipe, standard
library only. Install chromium with ``scripts/ensure_browser.sh``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import pathname2url

# The real binary first: Debian's /usr/bin/chromium is a shell wrapper that sources
# /etc/chromium.d (extra flags, API keys) and is noisy on some hosts.
_CANDIDATES = (
    "/usr/lib/chromium/chromium",
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
    "chrome-headless-shell",
)
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # root in containers/CI; pages are our own files
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # belt and braces: no DNS either
    "--remote-debugging-pipe",
)
# Requests the pages may make; anything else is blocked and reported.
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")

_PAGE_JS = """(async () => {
  const imgs = [...document.images];
  for (const i of imgs) i.loading = "eager";
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => {
    i.addEventListener("load", r); i.addEventListener("error", r); setTimeout(r, 5000);
  })));
  return {
    readyState: document.readyState,
    title: document.title,
    bodyText: document.body ? document.body.innerText.trim().length : -1,
    bodyElements: document.body ? document.body.getElementsByTagName("*").length : 0,
    images: imgs.map(i => ({src: (i.getAttribute("src") || "").slice(0, 60),
                            complete: i.complete, width: i.naturalWidth})),
    links: [...document.querySelectorAll("a[href]")].map(
      a => ({raw: a.getAttribute("href"), url: a.href})),
  };
})()"""


class BrowserError(RuntimeError):
    """Chromium could not be started or stopped answering."""


def find_chromium() -> str | None:
    """Path of a chromium binary (``$VLMFIT_CHROMIUM`` first), or None."""
    env = os.environ.get("VLMFIT_CHROMIUM")
    for name in ((env,) if env else ()) + _CANDIDATES:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


class Chromium:
    """A headless chromium driven over the DevTools pipe. Use as a context manager."""

    def __init__(self, binary: str | None = None, timeout: float = 30.0) -> None:
        binary = binary or find_chromium()
        if not binary:
            raise BrowserError("chromium not found: run scripts/ensure_browser.sh")
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._responses: dict[int, dict[str, Any]] = {}
        self._next_id = 0
        self._buf = b""
        self._profile = tempfile.mkdtemp(prefix="vlmfit-chromium-")
        self._log = open(os.path.join(self._profile, "stderr.log"), "wb")  # noqa: SIM115
        # Parent ends stay close-on-exec; the child's ends move to fds 3 and 4.
        cmd_r, self._w = os.pipe()
        self._r, resp_w = os.pipe()
        hi_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10)
        hi_w = fcntl.fcntl(resp_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(cmd_r)
        os.close(resp_w)

        def child_fds() -> None:
            os.dup2(hi_r, 3)  # chromium reads commands from fd 3 ...
            os.dup2(hi_w, 4)  # ... and writes replies and events to fd 4

        try:
            self.proc = subprocess.Popen(
                [binary, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._log,
                close_fds=False,  # Python's own fds are close-on-exec anyway
                preexec_fn=child_fds,
            )
        except OSError as e:
            self._log.close()
            shutil.rmtree(self._profile, ignore_errors=True)
            os.close(self._r)
            os.close(self._w)
            raise BrowserError(f"cannot start {binary}: {e}") from e
        finally:
            os.close(hi_r)
            os.close(hi_w)
        try:
            self.send("Browser.getVersion")
        except BrowserError:
            self.close()
            raise

    # -- protocol -------------------------------------------------------------------------
    def _stderr(self) -> str:
        try:
            return Path(self._profile, "stderr.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _pump(self, deadline: float) -> None:
        """Read at least one message (or fail at ``deadline``); sort replies from events."""
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"chromium did not answer in time\n{self._stderr()}")
            ready, _, _ = select.select([self._r], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise BrowserError(f"chromium exited ({self.proc.poll()})\n{self._stderr()}")
            self._buf += chunk
        while b"\0" in self._buf:
            raw, self._buf = self._buf.split(b"\0", 1)
            msg = json.loads(raw)
            if "id" in msg:
                self._responses[msg["id"]] = msg
            else:
                self.events.append(msg)

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send one command and wait for its result (raises on a protocol error)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._w, data) :]
        except (BrokenPipeError, OSError) as e:
            raise BrowserError(f"chromium is gone ({e})\n{self._stderr()}") from e
        deadline = time.monotonic() + (timeout or self.timeout)
        while self._next_id not in self._responses:
            self._pump(deadline)
        reply = self._responses.pop(self._next_id)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message', reply['error'])}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str, timeout: float | None = None) -> bool:
        """Wait for an event of ``session`` (left in :attr:`events`); False on timeout."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            if any(e["method"] == method and e.get("sessionId") == session for e in self.events):
                return True
            try:
                self._pump(deadline)
            except BrowserError:
                if time.monotonic() >= deadline and self.proc.poll() is None:
                    return False
                raise

    def drain(self, seconds: float) -> None:
        """Collect whatever events arrive within ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._r], [], [], max(deadline - time.monotonic(), 0))
            if ready:
                self._pump(deadline + self.timeout)

    # -- pages ----------------------------------------------------------------------------
    def inspect(self, url: str, settle: float = 0.3) -> dict[str, Any]:
        """Open ``url`` in a fresh tab; the page's facts, its requests and its errors."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        try:
            for domain in ("Page", "Network", "Runtime", "Log"):
                self.send(f"{domain}.enable", session=sid)
            self.send(
                "Network.setBlockedURLs",
                {"urls": ["http://*", "https://*", "ws://*", "wss://*", "ftp://*"]},
                session=sid,
            )
            self.events = [e for e in self.events if e.get("sessionId") != sid]
            nav = self.send("Page.navigate", {"url": url}, session=sid)
            facts: dict[str, Any] = {"url": url, "navigate_error": nav.get("errorText")}
            facts["loaded"] = not facts["navigate_error"] and self.wait_event(
                "Page.loadEventFired", sid
            )
            if facts["loaded"]:
                res = self.send(
                    "Runtime.evaluate",
                    {"expression": _PAGE_JS, "awaitPromise": True, "returnByValue": True},
                    session=sid,
                )
                if "exceptionDetails" in res:
                    facts["eval_error"] = res["exceptionDetails"].get("text", "exception")
                else:
                    facts.update(res["result"]["value"])
            self.drain(settle)  # late requests (dynamic imports) and console messages
            mine = [e for e in self.events if e.get("sessionId") == sid]
            self.events = [e for e in self.events if e.get("sessionId") != sid]
            facts["requests"] = [
                e["params"]["request"]["url"][:200]
                for e in mine
                if e["method"] == "Network.requestWillBeSent"
            ]
            facts["errors"] = _errors(mine)
            return facts
        finally:
            self.send("Target.closeTarget", {"targetId": target})

    def close(self) -> None:
        """Stop chromium and remove its temporary profile."""
        if getattr(self, "proc", None) and self.proc.poll() is None:
            with contextlib.suppress(BrowserError):
                self.send("Browser.close", timeout=5)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._r = self._w = -1
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _errors(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions and error-level log entries."""
    out = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
            out.append(f"console.{p['type']}: {args}")
        elif e["method"] == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append(f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}")
        elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            out.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
    return out


def _local_path(url: str) -> Path | None:
    parts = urlsplit(url)
    return Path(unquote(parts.path)) if parts.scheme == "file" else None


def check_reports(
    folder: str | Path, *, binary: str | None = None, timeout: float = 30.0
) -> list[str]:
    """Problems with the HTML reports in ``folder`` as seen by headless chromium.

    Visits ``index.html`` (when present), every ``*.html`` in ``folder`` and every local
    page they link to. An empty list means: every page loaded with a title and a body,
    every image rendered, every local link resolved, no request left ``file:``/``data:``
    and nothing was logged at level error; also that ``index.html`` links every report.
    """
    folder = Path(folder).resolve()
    pages = sorted(folder.glob("*.html"), key=lambda p: (p.name != "index.html", p.name))
    if not pages:
        return [f"{folder}: no HTML pages"]
    problems: list[str] = []
    seen: set[Path] = set()
    queue = list(pages)
    index_links: set[Path] = set()
    with Chromium(binary, timeout=timeout) as browser:
        while queue:
            page = queue.pop(0).resolve()
            if page in seen:
                continue
            seen.add(page)
            name = page.relative_to(folder) if page.is_relative_to(folder) else page
            facts = browser.inspect("file://" + pathname2url(str(page)))
            say = lambda msg, name=name: problems.append(f"{name}: {msg}")  # noqa: E731
            if facts.get("navigate_error"):
                say(f"did not load ({facts['navigate_error']})")
                continue
            if not facts["loaded"]:
                say("no load event")
                continue
            if "eval_error" in facts:
                say(f"could not be inspected ({facts['eval_error']})")
                continue
            if facts["readyState"] != "complete":
                say(f"document.readyState is {facts['readyState']!r}")
            if not facts["title"].strip():
                say("no <title>")
            if facts["bodyText"] <= 0 or facts["bodyElements"] == 0:
                say("empty <body>")
            for i, img in enumerate(facts["images"]):
                if not (img["complete"] and img["width"] > 0):
                    say(f"image {i + 1} ({img['src']!r}) did not render")
            for url in facts["requests"]:
                if not url.startswith(LOCAL_SCHEMES):
                    say(f"external request {url[:100]}")
            for err in dict.fromkeys(facts["errors"]):
                if "ERR_BLOCKED_BY_CLIENT" not in err:  # reported above as external
                    say(err[:300])
            for link in facts["links"]:
                target = _local_path(link["url"])
                if target is None:
                    continue  # http(s)/mailto anchors are not loaded by opening a page
                if not target.exists():
                    say(f"link {link['raw']!r} -> missing {target}")
                    continue
                if page.name == "index.html" and page.parent == folder:
                    index_links.add(target.resolve())
                if target.suffix == ".html" and target.resolve() not in seen:
                    queue.append(target)
    from vlmfit.report.render import report_status

    for p in pages:
        if p.name != "index.html" and report_status(p) == "failed":
            problems.append(f"{p.name}: its notebook crashed (see {p.with_suffix('.ipynb').name})")
    index = folder / "index.html"
    if index.exists():
        for p in pages:
            if p.name != "index.html" and p.resolve() not in index_links:
                problems.append(f"index.html: does not link {p.name}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python tests/browser.py [FOLDER]``: print problems; exit status 1 if any."""
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0] if args else "reports")
    if not find_chromium():
        print("browser: chromium not found: run scripts/ensure_browser.sh", file=sys.stderr)
        return 2
    problems = check_reports(folder)
    for p in problems:
        print(p)
    n = len(list(folder.glob("*.html")))
    print(f"{folder}: {n} page(s), {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
