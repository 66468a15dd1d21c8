"""``python -m modelfleet.worker.fetch --cache DIR --source SRC [--backend B]``: download one
source into the model cache, as a child process of the worker.

A child process, not a thread of the agent, so that a download nobody wants any more (the
deployment was deleted) is stopped by a signal, and so that the Hub client's process-wide
settings (``HF_HUB_OFFLINE``, ``HF_ENDPOINT``) are read from this process's environment.

It speaks JSON lines on stdout, one object each:

    {"event": "plan", "files": N, "total": BYTES|null, "done": BYTES, "revision": "…"}
    {"event": "progress", "done": BYTES}                      at most every PROGRESS_EVERY s
    {"event": "done", "path": "…", "bytes": BYTES, "downloaded": BYTES}
    {"event": "error", "kind": "gated|auth|not_found|…", "message": "…"}

and exits 0 after "done", 2 after "error". Diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from modelfleet.hubs import DEFAULT_TIMEOUT, FetchError
from modelfleet.sources import Plan, SourceError
from modelfleet.worker.modelcache import ModelCache

PROGRESS_EVERY = 0.25


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m modelfleet.worker.fetch")
    p.add_argument("--cache", required=True, help="the model cache root")
    p.add_argument("--source", required=True)
    p.add_argument("--backend", default=None, help="decides which files a repository means (llama.cpp: one GGUF)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="per request, seconds")
    args = p.parse_args(argv)

    done = 0
    last = 0.0

    def on_plan(plan: Plan, present: int) -> None:
        nonlocal done
        done = present
        emit(
            "plan",
            files=len(plan.files),
            total=plan.total,
            done=present,
            revision=plan.revision,
            model_path=plan.model_path,
        )

    def progress(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY:
            last = now
            emit("progress", done=done)

    try:
        entry, downloaded = ModelCache(Path(args.cache)).fetch(
            args.source, args.backend or None, on_plan=on_plan, progress=progress, timeout=args.timeout
        )
    except FetchError as exc:
        emit("error", kind=exc.kind, message=exc.message)
        return 2
    except SourceError as exc:
        emit("error", kind="invalid", message=str(exc))
        return 2
    except OSError as exc:
        kind = "disk" if exc.errno in (28, 122) else "io"  # ENOSPC, EDQUOT
        emit("error", kind=kind, message=f"{args.source}: {exc}")
        return 2
    emit("done", path=str(entry.path), bytes=entry.bytes, downloaded=downloaded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
