"""The gateway tests' real cluster (controller, scripted upstreams, fake worker, gateway)."""

from tests.gateway.conftest import cluster  # noqa: F401  (a fixture)
