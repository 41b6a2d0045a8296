class RequestRejected(ValueError):
    """A request that can never be served (too long for max_model_len or for the whole KV pool)."""
