"""modelfleet: one OpenAI-compatible endpoint in front of many machines running models."""

__version__ = "0.1.0"
