"""Hydra composition -> typed `PhaseConfig` (unknown keys fail here, naming the key)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from ar2diff.config.schema import PhaseConfig



def to_phase_config(cfg: DictConfig) -> PhaseConfig:
    """Merge the composed YAML onto the typed schema and return the dataclass instance."""
    missing = sorted(OmegaConf.missing_keys(cfg))  # before the merge: merging '???' keeps the schema default
    if missing:
        raise ValueError(f"config values are required but missing: {missing}; give them on the command line, "
                         "e.g. model.path=/path/to/checkpoint")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PhaseConfig), cfg)
    except (ConfigKeyError, ValidationError) as err:
        key = getattr(err, "full_key", None)
        raise ValueError(f"bad config key {key!r}: {err.msg if hasattr(err, 'msg') else err}") from None
    return OmegaConf.to_object(merged)


def compose(overrides: list[str]) -> PhaseConfig:
    """Compose conf/config.yaml with Hydra overrides, recipes from recipes/ (and from any `hydra.searchpath`
    folder given); works inside and outside a @hydra.main app, from any working directory."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ar2diff.config.paths import CONF_DIR, search_path_override

    overrides = search_path_override(list(overrides))
    if GlobalHydra.instance().is_initialized():
        return to_phase_config(hydra_compose(config_name="config", overrides=overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_phase_config(hydra_compose(config_name="config", overrides=overrides))
