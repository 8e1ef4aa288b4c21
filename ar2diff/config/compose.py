"""Hydra composition -> typed `PhaseConfig` (unknown keys fail here, naming the key)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, ValidationError

from ar2diff.config.paths import CONF_DIR, search_path_override
from ar2diff.config.schema import PhaseConfig


def to_phase_config(cfg: DictConfig) -> PhaseConfig:
    """Merge the composed YAML onto the typed schema and return the dataclass instance."""
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))  # before the merge: merging '???' keeps the schema default
    except InterpolationResolutionError as err:  # a '???' reached through ${...}, e.g. a pipeline's inputs
        missing = [str(err).split("Missing mandatory value:")[-1].split()[0]]
    if missing:
        raise ValueError(f"config values are required but missing: {missing}; give them on the command line, "
                         f"e.g. {missing[0]}=...")
    try:
        # as a plain container: a node Hydra already typed from the schema would let a `+new.key` through the merge
        plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        merged = OmegaConf.merge(OmegaConf.structured(PhaseConfig), plain)
        return OmegaConf.to_object(merged)
    except (ConfigKeyError, ValidationError) as err:
        key = getattr(err, "full_key", None)
        raise ValueError(f"bad config key {key!r}: {err.msg if hasattr(err, 'msg') else err}") from None
    except InterpolationResolutionError as err:  # e.g. a pipeline's '???' inputs reached through ${inputs.x}
        text = str(err).splitlines()[0]
        if "Missing mandatory value:" in text:
            key = text.split("Missing mandatory value:")[1].split()[0]
            raise ValueError(f"config value {key} is required but missing (used by {err.full_key}); give it on "
                             f"the command line, e.g. {key}=...") from None
        raise ValueError(f"config key {err.full_key!r}: {text}") from None


def compose(overrides: list[str]) -> PhaseConfig:
    """Compose conf/config.yaml with Hydra overrides, recipes from recipes/ (and from any `hydra.searchpath`
    folder given); works inside and outside a @hydra.main app, from any working directory."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = search_path_override(list(overrides))
    if GlobalHydra.instance().is_initialized():
        return to_phase_config(hydra_compose(config_name="config", overrides=overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_phase_config(hydra_compose(config_name="config", overrides=overrides))
