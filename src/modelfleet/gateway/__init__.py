"""The gateway: the OpenAI-compatible front door that routes from its own cached table.

Entry points: ``GatewaySettings``, ``create_app(settings)`` (ASGI) and
``run_gateway(settings)`` (blocking). ``python -m modelfleet.gateway --controller URL``
runs one without the main CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelfleet.gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from modelfleet.gateway.api import GatewayApp

__all__ = ["GatewaySettings", "create_app", "run_gateway"]

# The app and server modules load on first use, so importing the settings stays cheap.


def create_app(settings: GatewaySettings, process_index: int = 0) -> GatewayApp:
    from modelfleet.gateway.api import create_app as _create

    return _create(settings, process_index)


def run_gateway(settings: GatewaySettings) -> None:
    from modelfleet.gateway.app import run_gateway as _run

    _run(settings)

