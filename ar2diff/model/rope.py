"""RoPE settings of a transformers config, and the context-extension rule that theta only goes up.

Context extension (docs/design.md phase 2; ZAYA1: theta 1M at 32K -> 5M at 131K) lengthens the rotary wavelengths so
that positions beyond the trained length look like positions the model has seen. Lowering theta does the
opposite (shorter wavelengths, more unseen phases), so a recipe that lowers it is a configuration error.
"""

from __future__ import annotations


def rope_thetas(config) -> dict[str, float]:
    """{layer type: rope_theta} for the layer types the model uses ({"default": theta} for a flat RoPE config).

    Nested per-layer-type RoPE parameters (ZAYA, Gemma-style) list entries for layer types a model may not use
    (tiny ZAYA has only "hybrid" layers); only the used ones count.
    """
    params = getattr(config, "rope_parameters", None)
    if not params:
        theta = getattr(config, "rope_theta", None)
        return {} if theta is None else {"default": float(theta)}
    if all(isinstance(v, dict) for v in params.values()):
        used = set(getattr(config, "layer_types", None) or params)
        return {k: float(v["rope_theta"]) for k, v in params.items() if k in used and "rope_theta" in v}
    return {"default": float(params["rope_theta"])} if "rope_theta" in params else {}


def check_theta_raised(before: dict[str, float], after: dict[str, float], source: str = "model.path") -> None:
    """Raise ValueError unless every used layer type's theta is strictly higher after the override."""
    for layer_type, old in before.items():
        new = after.get(layer_type, old)
        if not new > old:
            raise ValueError(
                f"model.rope.rope_theta={new:g} does not raise the RoPE theta of the starting checkpoint "
                f"({source}: {layer_type} layers use {old:g}); context extension must raise theta (e.g. ZAYA1 "
                f"1M -> 5M), set model.rope.rope_theta above {old:g}")
