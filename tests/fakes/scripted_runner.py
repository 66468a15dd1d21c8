"""A scripted runner process for Supervisor tests (never a default backend).

Standard library only, so it starts in a few tens of milliseconds: the Supervisor's
rules (readiness budget, crash and backoff, hang detection, stop, orphans) are tested
without paying a model load each time. Behaviour by flags:

- ``--mode ok``: serve /health and /v1/models (200) until killed;
- ``--mode never-ready``: stay alive, never listen;
- ``--mode exit``: exit at once with ``--code`` (after printing a line to the log);
- ``--mode crash-after``: serve for ``--seconds``, then exit with ``--code``;
- ``--mode hang-after``: serve for ``--seconds``, then stop answering (alive, silent);
- ``--ignore-term``: ignore SIGTERM (the Supervisor must SIGKILL after its grace);
- ``--child``: start a child process (``sleep``) in the same process group, to check
  that stopping the runner takes its children too; its pid goes to the log.

Registered in tests as backend ``scripted`` (see tests/runners/conftest.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HANG = threading.Event()


class Handler(BaseHTTPRequestHandler):
    name = "scripted"

    def do_GET(self) -> None:
        if HANG.is_set():
            time.sleep(3600)
            return
        if self.path in ("/health", "/v1/models"):
            body = json.dumps({"object": "list", "data": [{"id": self.name, "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:  # quiet: one line per probe is noise
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", default="scripted")
    ap.add_argument("--mode", default="ok", choices=["ok", "never-ready", "exit", "crash-after", "hang-after"])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--code", type=int, default=3)
    ap.add_argument("--ignore-term", action="store_true")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    print(f"scripted runner pid {os.getpid()} mode {args.mode} port {args.port}", flush=True)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.child:
        child = subprocess.Popen(["sleep", "3600"])
        print(f"child pid {child.pid}", flush=True)
    if args.mode == "exit":
        print(f"failing on purpose with code {args.code}", file=sys.stderr, flush=True)
        sys.exit(args.code)
    if args.mode == "never-ready":
        print("loading forever", flush=True)
        while True:
            time.sleep(3600)
    Handler.name = args.name
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    if args.mode == "crash-after":
        time.sleep(args.seconds)
        print(f"crashing on purpose with code {args.code}", flush=True)
        os._exit(args.code)
    if args.mode == "hang-after":
        time.sleep(args.seconds)
        print("hanging on purpose", flush=True)
        HANG.set()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
