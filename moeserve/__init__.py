"""moeserve: an LLM inference-serving engine built first for Mixture-of-Experts models."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):
    # Lazy, so that `moeserve.plan` (no torch) stays importable without pulling torch in.
    if name == "LLM":
        from moeserve.llm import LLM
        return LLM
    if name == "SamplingParams":
        from moeserve.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(name)
