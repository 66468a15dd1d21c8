"""A small synchronous client of the controller API, for the CLI: any healthy controller of the list."""

from __future__ import annotations

from typing import Any

import httpx


class ClusterError(Exception):
    """A call no controller could answer, or an error answer (message from the OpenAI error body)."""


class ControllerClient:
    def __init__(self, controllers: list[str], admin_token: str | None = None, timeout: float = 10.0) -> None:
        if not controllers:
            raise ClusterError("no controller given (--controller or MODELFLEET_CONTROLLER)")
        self.controllers = controllers
        self.headers = {"authorization": f"Bearer {admin_token}"} if admin_token else {}
        self.timeout = timeout

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Try each controller in turn; move on when one is unreachable or its store is down (503)."""
        problems: list[str] = []
        for base in self.controllers:
            try:
                r = httpx.request(method, f"{base}{path}", headers=self.headers, timeout=self.timeout, **kwargs)
            except httpx.HTTPError as exc:
                problems.append(f"{base}: {type(exc).__name__}")
                continue
            if r.status_code == 503:
                problems.append(f"{base}: {error_message(r)}")
                continue
            if r.status_code >= 400:
                raise ClusterError(f"{r.status_code}: {error_message(r)}")
            return r.json() if r.content else None
        raise ClusterError("no controller answered: " + "; ".join(problems))

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})


def error_message(r: httpx.Response) -> str:
    try:
        body = r.json()
        return str(body.get("error", {}).get("message") or body)
    except ValueError:
        return r.text[:200] or r.reason_phrase
