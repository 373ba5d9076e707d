"""OpenAI-compatible HTTP serving over the continuous-batching engine: `protocol` (the wire format as pure functions)
and `app` (`create_app`, the FastAPI routes)."""
