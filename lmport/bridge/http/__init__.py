"""The OpenAI-compatible HTTP server: a second transport over lmport.bridge.service (see docs/serving.md)."""
