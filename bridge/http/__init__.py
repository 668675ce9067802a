"""The OpenAI-compatible HTTP server: a second transport over bridge.service (see docs/serving.md)."""
