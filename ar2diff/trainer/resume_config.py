"""Refuse to resume a run under a config that changes what it trains on or how.

The resolved config of a run is written to `RUN_DIR/resolved_config.json` when it starts. A later start in the same
folder that finds a complete checkpoint compares the new config with it: any difference outside the keys that only
change how a run is observed or stored (logging, checkpoint cadence, the phase-end check…) would splice two
different runs together, e.g. a changed `budget.tokens` silently reshapes the learning-rate schedule. Such a resume
is refused with every difference listed, unless `trainer.allow_config_change=true`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ar2diff.config.schema import PhaseConfig
from ar2diff.fs import write_json_atomic

log = logging.getLogger(__name__)

CONFIG_NAME = "resolved_config.json"

# Keys (dotted prefixes) that may change between a run and its resume: they do not alter the trained numbers.
HARMLESS = ("run_dir", "logger", "decoder", "trainer.log_every", "trainer.ckpt_every", "trainer.keep_last",
            "trainer.heldout_batches", "trainer.peak_flops", "trainer.allow_config_change",
            "trainer.max_nonfinite_skips", "trainer.memory_plan_check", "trainer.export_every",
            "trainer.collective_timeout_minutes", "trainer.rank0_timeout_minutes", "trainer.start_over",
            "data.cache_dir", "data.num_proc", "inputs", "pipeline")


class ConfigChanged(ValueError):
    """The resume config differs from the saved one in keys that change training."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} for nested dicts and lists (list items as "a.0")."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    if not out and prefix:
        out[prefix] = tree  # keep empty containers visible
    return out


def _harmless(key: str) -> bool:
    return any(key == h or key.startswith(h + ".") for h in HARMLESS)


def schema_defaults() -> dict[str, Any]:
    """The flattened defaults of a phase config, in their stored (JSON) form."""
    return flatten(json.loads(json.dumps(asdict(PhaseConfig()), default=str)))


def config_differences(saved: dict, new: dict) -> list[str]:
    """'key: saved -> new' for every key whose value differs and that is not in HARMLESS (sorted). A key the saved
    config lacks (written before the key existed) differs only if its new value is not the schema's default."""
    a, b = flatten(saved), flatten(new)
    missing = object()
    defaults = schema_defaults()
    diffs = []
    for key in sorted(set(a) | set(b)):
        old, cur = a.get(key, missing), b.get(key, missing)
        if old is missing and key in defaults and cur == defaults[key]:
            continue
        if old != cur and not _harmless(key):
            show = lambda v: "(unset)" if v is missing else json.dumps(v, default=str)  # noqa: E731
            diffs.append(f"{key}: {show(old)} -> {show(cur)}")
    return diffs


def check_resume_config(run_dir: str | Path, config: dict, resuming: bool, allow_change: bool,
                        write: bool = True) -> list[str]:
    """Compare `config` with the saved one when `resuming`; raise ConfigChanged unless `allow_change`.

    Writes `config` as the run's resolved config when starting fresh (or when a change is allowed) if `write`
    (rank 0 only). Returns the differences found (empty when none, or when not resuming).
    """
    path = Path(run_dir) / CONFIG_NAME
    config = json.loads(json.dumps(config, default=str))  # the form it is stored in: JSON types only
    diffs: list[str] = []
    if resuming and path.is_file():
        diffs = config_differences(json.loads(path.read_text()), config)
        if diffs and not allow_change:
            raise ConfigChanged(f"resuming {run_dir} with a config that changes training ({len(diffs)} "
                                f"difference(s): {'; '.join(diffs)}); use the original values, a new run_dir, or "
                                "trainer.allow_config_change=true to resume anyway")
        if diffs:
            log.warning("resuming %s with changed config (trainer.allow_config_change=true): %s", run_dir,
                        "; ".join(diffs))
    if write and (diffs or not path.is_file() or not resuming):
        write_json_atomic(path, config)
    return diffs
