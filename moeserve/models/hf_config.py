"""Read an HF config.json the way the models need it: attribute access, aliases resolved, clear errors.

Pure Python (no torch), so the planner can share it.
"""

from __future__ import annotations

from typing import Any

_REQUIRED = object()

# Different transformers versions (and checkpoints) spell some fields differently.
_ALIASES = {
    "num_experts": ("num_local_experts", "n_routed_experts"),
    "num_local_experts": ("num_experts", "n_routed_experts"),
}


def normalize(cfg: dict) -> dict:
    """A copy of `cfg` with the nested text model unwrapped and the rope fields in their classic form."""
    cfg = dict(cfg)
    if "text_config" in cfg and isinstance(cfg["text_config"], dict):
        text = dict(cfg["text_config"])
        text.setdefault("architectures", cfg.get("architectures"))
        cfg = text
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):  # transformers >= 5 keeps theta and scaling together
        cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if cfg.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return cfg


class HFConfig:
    """Attribute view of a config dict: `cfg.hidden_size` raises a clear error when the field is missing."""

    def __init__(self, cfg: dict, source: str = "config.json"):
        object.__setattr__(self, "_cfg", normalize(cfg))
        object.__setattr__(self, "_source", source)

    @property
    def architecture(self) -> str:
        archs = self._cfg.get("architectures") or []
        if not archs:
            raise ValueError(f"{self._source} has no 'architectures' field, so the model class is unknown.")
        return archs[0]

    def get(self, name: str, default: Any = None) -> Any:
        if name in self._cfg and self._cfg[name] is not None:
            return self._cfg[name]
        for alias in _ALIASES.get(name, ()):
            if self._cfg.get(alias) is not None:
                return self._cfg[alias]
        return default

    def __getattr__(self, name: str) -> Any:
        value = self.get(name, _REQUIRED)
        if value is _REQUIRED:
            raise ValueError(
                f"{self._source} is missing the field '{name}', which {self._cfg.get('architectures', ['this model'])[0]} needs."
            )
        return value

    def __setattr__(self, name, value):
        raise AttributeError("HFConfig is read-only")

    @property
    def head_dim(self) -> int:
        return self.get("head_dim") or self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return dict(self._cfg)
