"""``python -m modelfleet.worker.runners.llama_cpp_server``: llama-cpp-python's own OpenAI
server (``python -m llama_cpp.server``, same flags), with one change: each request's line in
the runner log carries the gateway's request id (request_log.py) instead of uvicorn's access
line, which has none. Everything else (argument parsing, the app, its settings) is
llama-cpp-python's ``main()`` as is; we only wrap the app it creates and the server call."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import uvicorn

from modelfleet.worker.runners.openai_http import setup_logging
from modelfleet.worker.runners.request_log import RequestLog


def main() -> None:
    import llama_cpp.server.__main__ as server_main

    setup_logging()
    create_app = server_main.create_app

    def create_logged_app(*args: Any, **kwargs: Any) -> Any:
        # hide_id: its starlette-context middleware refuses (400) an X-Request-ID that is not a
        # UUID, and clients choose their ids; we log the id, it has no use for it.
        return RequestLog(create_app(*args, **kwargs), hide_id=True)

    def run(app: Any, **kwargs: Any) -> None:
        # Our line per request replaces uvicorn's; uvicorn's own warnings go through logs.py.
        # (log_level None: uvicorn's loggers keep the levels logs.py gave them.)
        uvicorn.run(app, **{**kwargs, "access_log": False, "log_config": None, "log_level": None})

    server_main.create_app = create_logged_app  # type: ignore[assignment]
    server_main.uvicorn = SimpleNamespace(run=run)  # type: ignore[assignment]
    sys.argv[0] = "llama_cpp.server"
    server_main.main()


if __name__ == "__main__":
    main()
