"""Errors the engine raises about one request (the server maps them to HTTP 400)."""


class RequestRejected(ValueError):
    """A request that can never be served (too long for max_model_len or for the whole KV pool). `code` is the
    OpenAI-style error code the server answers with."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code
