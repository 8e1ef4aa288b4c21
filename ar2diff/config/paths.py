"""Where the configs live: the top-level `conf/` (config groups) and `recipes/` (phase recipes, the `recipe` group).

In a source checkout they are the repository's `conf/` and `recipes/`; in an installed wheel they are mapped into
the package at build time (`ar2diff/conf/`, `ar2diff/recipes/`, see setup.py), so every working directory
and every install finds the same configs. Hydra sees `recipes/` through the `recipes://DIR` config source, which
serves DIR's YAML files as the `recipe` group; user recipe folders are ordinary Hydra search-path entries
(`hydra.searchpath=[file://DIR]` with DIR/recipe/NAME.yaml), merged with the built-in one by `search_path_override`.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra._internal.sources_registry import SourcesRegistry
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigResult

from ar2diff.config.schema import PhaseConfig

PACKAGE_DIR = Path(__file__).resolve().parents[1]
RECIPE_GROUP = "recipe"


def _locate(name: str, marker: str) -> Path:
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):  # installed wheel, then source checkout
        if (candidate / marker).is_file():
            return candidate
    raise FileNotFoundError(f"ar2diff's {name}/ folder is missing (looked in {PACKAGE_DIR / name} and "
                            f"{PACKAGE_DIR.parent / name}); reinstall ar2diff")


CONF_DIR = _locate("conf", "config.yaml")
RECIPES_DIR = _locate("recipes", "quickstart.yaml")


class RecipesSource(FileConfigSource):
    """`recipes://DIR`: the YAML files of DIR as the `recipe` config group (nothing else)."""

    @staticmethod
    def scheme() -> str:
        return "recipes"

    @staticmethod
    def _inner(config_path: str) -> str | None:
        if config_path in ("", RECIPE_GROUP):
            return ""
        prefix = RECIPE_GROUP + "/"
        return config_path[len(prefix):] if config_path.startswith(prefix) else None

    def load_config(self, config_path: str) -> ConfigResult:
        return super().load_config(self._inner(config_path) or config_path)

    def is_group(self, config_path: str) -> bool:
        return config_path == "" or config_path == RECIPE_GROUP

    def is_config(self, config_path: str) -> bool:
        inner = self._inner(config_path)
        return bool(inner) and super().is_config(inner)

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        if config_path != RECIPE_GROUP:
            return []
        return [f"{RECIPE_GROUP}/{name}" for name in super().list("", results_filter)]


SourcesRegistry.instance().register(RecipesSource)


def _store_schema() -> None:
    """The typed defaults (config/schema.py's PhaseConfig) as the base of conf/config.yaml (`- ar2diff_schema`), so
    YAML states only what differs from them and every schema key is overridable."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="ar2diff_schema", node=PhaseConfig)


_store_schema()
BUILTIN_SEARCH_PATH = f"recipes://{RECIPES_DIR}"


def search_path_override(overrides: list[str]) -> list[str]:
    """`overrides` with `hydra.searchpath` holding the built-in recipes after any user entries."""
    out, user = [], []
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+") == "hydra.searchpath":
            user = [v.strip() for v in value.strip().strip("[]").split(",")
                    if v.strip() and v.strip() != BUILTIN_SEARCH_PATH]
        else:
            out.append(o)
    entries = ",".join([*user, BUILTIN_SEARCH_PATH])
    return [*out, f"hydra.searchpath=[{entries}]"]



def user_search_path(hydra_overrides: list[str]) -> list[str]:
    """The user's own `hydra.searchpath=[...]` among Hydra's overrides (built-in entry removed), for the resume
    command; [] when there is none."""
    for o in hydra_overrides:
        if o.startswith("hydra.searchpath="):
            entries = [v for v in search_path_override([o])[-1].split("=", 1)[1].strip("[]").split(",")
                       if v and v != BUILTIN_SEARCH_PATH]
            return [f"hydra.searchpath=[{','.join(entries)}]"] if entries else []
    return []
