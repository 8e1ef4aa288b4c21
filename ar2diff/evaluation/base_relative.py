"""Base-relative held-out quality: the phase's checkpoint, its starting checkpoint and the pipeline's original base
scored on the same held-out rows.

Each checkpoint is loaded as it was exported (its own config.json, so its own RoPE settings and context limit):
the AR loss always, the diffusion loss when it has a mask token (ar2diff.json names one). The original base is
found by following `base_model` in each export's ar2diff.json back to the first checkpoint that was not made by a
diffusion phase (an AR pretraining export, or a folder without ar2diff.json such as a downloaded model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ar2diff.decode.metrics import ratio_interval
from ar2diff.evaluation.heldout import heldout_losses
from ar2diff.model.loading import load_model
from ar2diff.model.tidar import TidarLM
from ar2diff.objective import TidarObjective

METADATA = "ar2diff.json"
DIFFUSION_PHASES = ("tidar_midtrain", "context_extension", "diffusion_sft")


def read_meta(folder) -> dict:
    path = Path(folder) / METADATA
    return json.loads(path.read_text()) if path.is_file() else {}


def original_base(start_dir) -> Path:
    """The checkpoint a pipeline started from: follow base_model through diffusion-phase exports."""
    folder, seen = Path(start_dir), set()
    while read_meta(folder).get("phase") in DIFFUSION_PHASES:
        parent = read_meta(folder).get("base_model")
        if not parent or parent == "scratch" or not Path(parent).is_dir() or str(parent) in seen:
            break
        seen.add(str(parent))
        folder = Path(parent)
    return folder


def load_as_was(folder, dtype=torch.float32, device=None, alpha: float = 1.0):
    """A `TidarObjective` of an export (or plain HF folder) with its own config; kind "ar" without a mask token."""

    meta = read_meta(folder)
    lm = load_model(folder, dtype=dtype)
    if device is not None:
        lm = lm.to(device)
    mask = meta.get("mask_token_id")
    if mask is None:
        return TidarObjective(TidarLM(lm, None, int(meta.get("block_size") or 1)), kind="ar").eval()
    return TidarObjective(TidarLM(lm, int(mask), int(meta["block_size"])), alpha=alpha).eval()


def score(model, rows: dict[str, torch.Tensor], micro_batch: int, seed: int = 0) -> dict:
    """{loss_ar, loss_diff (None without a mask token), tokens_ar, tokens_diff} on rows."""
    h = heldout_losses(model, rows, micro_batch, seed=seed)
    has_diff = model.kind == "tidar"
    return {"loss_ar": h["loss_ar"], "loss_diff": h["loss_diff"] if has_diff else None,
            "tokens_ar": h["tokens_ar"], "tokens_diff": h["tokens_diff"]}


def row_ar_sums(model, rows: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(AR NLL sum, AR tokens) of each row: the units a paired interval resamples."""
    sums, tokens = [], []
    for i in range(rows["input_ids"].shape[0]):
        h = heldout_losses(model, {k: v[i:i + 1] for k, v in rows.items()}, 1)
        sums.append(h["loss_ar"] * h["tokens_ar"])
        tokens.append(h["tokens_ar"])
    return np.array(sums), np.array(tokens)


def paired_delta(end: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray],
                 confidence: float = 0.95, seed: int = 0) -> dict:
    """{loss_ar, low, high, confidence}: end - other AR loss per token on the same rows, with a percentile bootstrap
    interval over rows (each resample takes the same rows for both models: paired)."""
    (end_sums, tokens), (other_sums, _) = end, other
    low, high = ratio_interval(end_sums - other_sums, tokens, confidence=confidence, seed=seed)
    return {"loss_ar": float((end_sums - other_sums).sum() / max(tokens.sum(), 1)), "low": low, "high": high,
            "confidence": confidence}


def deltas(end: dict, other: dict) -> dict:
    """end - other for the AR and diffusion loss (None where either side has no value)."""
    return {key: None if end.get(key) is None or other.get(key) is None else end[key] - other[key]
            for key in ("loss_ar", "loss_diff")}


def compare(models: dict, rows: dict[str, torch.Tensor], micro_batch: int, seed: int = 0,
            confidence: float = 0.95) -> dict:
    """Score {"end", "start", "base"} models (any may be absent) on the same rows; deltas of end vs the others, the
    AR one also paired by row with its interval (`paired_vs_<other>`)."""
    by_model: dict[int, dict] = {}  # the base is often the start itself (midtrain): score it once
    by_row: dict[int, tuple] = {}
    scores = {}
    for name, m in models.items():
        if id(m) not in by_model:
            by_model[id(m)] = score(m, rows, micro_batch, seed)
            by_row[id(m)] = row_ar_sums(m, rows) if "end" in models and len(models) > 1 else None
        scores[name] = dict(by_model[id(m)])
    out = {"rows": int(rows["input_ids"].shape[0]), "seq_len": int(rows["input_ids"].shape[1]), "scores": scores}
    for other in ("start", "base"):
        if "end" in scores and other in scores:
            out[f"delta_vs_{other}"] = deltas(scores["end"], scores[other])
            out[f"paired_vs_{other}"] = paired_delta(by_row[id(models["end"])], by_row[id(models[other])],
                                                     confidence, seed)
    return out
