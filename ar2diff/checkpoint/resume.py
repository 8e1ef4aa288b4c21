"""DeepSpeed checkpoints for exact resume, written so that a crash never leaves one that looks complete.

Layout under ``ckpt_root`` (every rank must see the same filesystem)::

    step_00001000/              DeepSpeed files + rng_state_rank00000.pt ... + ar2diff_complete.json
    step_00001000.partial/      a save in progress (or one that crashed): never loaded
    latest                      DeepSpeed's pointer file ("step_00001000"), updated last, atomically
    hf/                         model config + tokenizer + run metadata (export_layout.save_run_assets)

A save goes to ``<tag>.partial``; after a barrier rank 0 writes the completion marker (step, world size,
ZeRO stage, size + sha256 of every file), renames the folder to ``<tag>`` and only then rewrites
``latest``. ``find_latest_complete`` trusts a folder only if its marker is present and the files still
match the manifest, so a half-written or truncated checkpoint is never resumed from. When folders with a marker
exist but none passes, ``load_checkpoint`` refuses (``NoVerifiedCheckpoint``) instead of starting from step 0 over
them, unless asked to start over.

DeepSpeed stores ``client_state`` once (rank 0's copy, inside the model-states file) and hands that same
copy to every rank on load. Per-rank RNG states therefore go to per-rank files written here, restored
by ``load_checkpoint``; put only rank-independent values (data position, tokens seen) in client_state.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import deepspeed.comm as dist
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

from ar2diff.checkpoint.coordination import all_gather_object, barrier, run_on_rank0
from ar2diff.checkpoint.integrity import pick_verified_checkpoint, refuse_or_start_over
from ar2diff.checkpoint.manifest import (  # noqa: F401 (re-exported)
    LATEST_NAME,
    MARKER_NAME,
    PARTIAL_SUFFIX,
    REPLACED_SUFFIX,
    RNG_FILE,
    TAG_RE,
    CheckpointRef,
    NoVerifiedCheckpoint,
    Verify,
    check_manifest,
    find_latest_complete,
    list_files,
    resolve_checkpoint,
    scan_checkpoints,
    step_dirs,
    step_tag,
)
from ar2diff.checkpoint.save_failure import agreed_save_error, describe_failure
from ar2diff.fs import sha256_file, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """RNG states of python ``random``, numpy, torch CPU and the current accelerator device.

    Tensors and plain python values only, so the result survives ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    accel = get_accelerator()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch_cpu": torch.get_rng_state(),
        "accelerator": {"name": accel.device_name(), "state": accel.get_rng_state()},
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state``. The accelerator part is skipped (with a warning) when the state
    was captured on a different kind of accelerator, e.g. a CUDA run resumed on CPU."""
    missing = {"python", "numpy", "torch_cpu", "accelerator"} - set(state)
    if missing:
        raise KeyError(f"RNG state lacks {sorted(missing)}; it must come from capture_rng_state()")
    random.setstate(_as_python_rng_state(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    accel = get_accelerator()
    if state["accelerator"]["name"] == accel.device_name():
        accel.set_rng_state(state["accelerator"]["state"])
    else:
        log.warning("RNG state was captured on accelerator %r, now running on %r: accelerator RNG not restored",
                    state["accelerator"]["name"], accel.device_name())


def _as_python_rng_state(value: Any) -> tuple:
    """random.setstate needs nested tuples; a state that went through a list-producing format is fixed."""
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


# ------------------------------------------------------------------------------------------- save


def _hash_manifest(partial_dir: Path, hash_files: bool) -> dict:
    """{name: {size, sha256}} for every file; the files are shared out across ranks.

    No rank reads the folder after the gather: rank 0 renames it as soon as the gather returns on rank 0, while a
    slower rank may still be returning from it (a rank once stat'ed a file after the rename, under load)."""
    names = run_on_rank0(list_files, partial_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {n: {"size": (partial_dir / n).stat().st_size, "sha256": sha256_file(partial_dir / n) if hash_files else None}
            for n in names[rank::world]}
    gathered: list = [None] * world
    all_gather_object(gathered, mine)
    entries = {k: v for part in gathered for k, v in part.items()}
    return {n: entries[n] for n in names}


def _client_summary(client_state: dict) -> dict:
    """The JSON scalars of client_state (tokens_seen, data position…), copied into the marker so that
    tools (export) read them without unpickling the model-states file."""
    return {k: v for k, v in client_state.items() if isinstance(v, (int, float, str, bool)) or v is None}


def save_checkpoint(engine, ckpt_root: str | os.PathLike, step: int, client_state: dict, *,
                    keep_last: int | None = None, hash_files: bool = True) -> CheckpointRef:
    """Save ``engine`` (module, optimizer, lr scheduler), ``client_state`` and every rank's RNG state as
    ``ckpt_root/step_XXXXXXXX``, atomically (see module docstring). Call on every rank.

    keep_last: after the save, delete all but the newest ``keep_last`` complete checkpoints older than
    this one (this one is never deleted), plus stale ``.partial`` folders of other steps.
    hash_files: record sha256 of each file (hashing is split across ranks); sizes are always recorded.
    The JSON scalars at the top level of client_state (e.g. ``tokens_seen``) are also copied into the
    marker, where ``python -m ar2diff.export`` reads them.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    if not isinstance(client_state, dict):
        raise TypeError(f"client_state must be a dict, got {type(client_state).__name__}")
    _check_engine_supported(engine)
    root, tag = Path(ckpt_root), step_tag(step)
    partial_dir = root / f"{tag}{PARTIAL_SUFFIX}"
    run_on_rank0(_prepare_partial_dir, partial_dir)
    failure = _write_rank_files(engine, root, partial_dir, client_state)
    # every rank's outcome, on every rank: also "every rank has finished writing" before anyone hashes the files
    outcomes: list = [None] * dist.get_world_size()
    all_gather_object(outcomes, None if failure is None else describe_failure(failure, partial_dir))
    if any(outcomes):
        raise agreed_save_error(root, partial_dir, outcomes) from failure

    marker = {
        "tag": tag, "step": step, "world_size": dist.get_world_size(),
        "zero_stage": int(engine.zero_optimization_stage()), "expert_parallel": bool(engine.has_moe_layers),
        "client_keys": sorted(client_state), "client_summary": _client_summary(client_state),
        "files": _hash_manifest(partial_dir, hash_files),
    }
    run_on_rank0(_commit, root, tag, marker, keep_last)
    barrier()
    return CheckpointRef(root=root, tag=tag, step=step, marker=marker)


def _write_rank_files(engine, root: Path, partial_dir: Path, client_state: dict) -> Exception | None:
    """This rank's share of the save (DeepSpeed's files, then its RNG state); None, or the error it met.

    A rank whose write fails inside DeepSpeed's save still runs the collectives DeepSpeed's save ends with, which the
    other ranks are in by then; without them they would wait there until the process-group timeout. In DeepSpeed
    0.19.8 those are the optimizer's checkpoint epilogue (ZeRO-3 re-gathers its persistent parameters) and a barrier
    on the default group: module, optimizer and expert state dicts are built locally and no other collective runs
    between the first file write and the end of the save (read for ZeRO 0-3 and the MoE path; tested at ZeRO-1 and
    ZeRO-3 in tests/test_checkpoint.py)."""
    try:
        engine.save_checkpoint(str(root), tag=partial_dir.name, client_state=client_state, save_latest=False)
    except Exception as err:  # reported on every rank by save_checkpoint
        epilogue = getattr(engine.optimizer, "checkpoint_event_epilogue", None)
        if epilogue is not None:
            epilogue()
        dist.barrier()
        return err
    try:
        torch.save(capture_rng_state(), partial_dir / RNG_FILE.format(rank=dist.get_rank()))
    except Exception as err:
        return err
    return None


def _check_engine_supported(engine) -> None:
    """The atomic commit needs every file on one shared filesystem, written when save_checkpoint returns."""
    if engine.use_node_local_storage():
        raise ValueError("DeepSpeed 'checkpoint.use_node_local_storage' is on: ar2diff checkpoints need one "
                         "filesystem shared by all ranks (rank 0 verifies and renames the folder); turn it off")
    if engine.checkpoint_engine.is_decoupled():
        raise ValueError("a decoupled (asynchronous) DeepSpeed checkpoint engine is configured: files may still "
                         "be in flight when the marker would be written; use the default synchronous engine")


def _prepare_partial_dir(partial_dir: Path) -> None:
    """Remove the leftovers of a crashed save of the same step, then create the folder."""
    if partial_dir.exists():
        shutil.rmtree(partial_dir)
    partial_dir.mkdir(parents=True)


def _commit(root: Path, tag: str, marker: dict, keep_last: int | None) -> None:
    """Rank 0: marker, then rename ``.partial`` -> tag (replacing an older save of the same step), then
    the ``latest`` pointer, then pruning. Each step leaves no folder that looks complete but is not."""
    partial_dir, final_dir = root / f"{tag}{PARTIAL_SUFFIX}", root / tag
    write_json_atomic(partial_dir / MARKER_NAME, marker, fsync=True, sort_keys=True)
    if final_dir.exists():
        replaced = root / f"{tag}{REPLACED_SUFFIX}"
        if replaced.exists():
            shutil.rmtree(replaced)
        os.replace(final_dir, replaced)
        os.replace(partial_dir, final_dir)
        _remove_checkpoint_dir(replaced)
    else:
        os.replace(partial_dir, final_dir)
    write_text_atomic(root / LATEST_NAME, tag, fsync=True)
    if keep_last is not None:
        prune_checkpoints(root, keep_last, protect_tag=tag)


def _remove_checkpoint_dir(folder: Path) -> None:
    """Delete the marker first, so a crash mid-delete leaves a folder that is no longer 'complete'."""
    (folder / MARKER_NAME).unlink(missing_ok=True)
    shutil.rmtree(folder)


def prune_checkpoints(ckpt_root: str | os.PathLike, keep_last: int, *, protect_tag: str) -> list[str]:
    """Delete complete checkpoints older than ``protect_tag`` beyond the newest ``keep_last`` (counting
    ``protect_tag``), and ``.partial``/``.replaced`` leftovers of other steps. Returns deleted names.
    Checkpoints newer than ``protect_tag`` (from an abandoned timeline) are kept, with a warning."""
    root = Path(ckpt_root)
    protect_step = int(TAG_RE.match(protect_tag).group(1))
    complete = [(s, t) for s, t in step_dirs(root) if (root / t / MARKER_NAME).is_file()]
    newer = [t for s, t in complete if s > protect_step]
    if newer:
        log.warning("checkpoints newer than %s exist under %s (%s); find_latest_complete prefers them",
                    protect_tag, root, newer)
    older = [t for s, t in complete if s < protect_step]
    doomed = older[max(keep_last - 1, 0):]
    for tag in doomed:
        _remove_checkpoint_dir(root / tag)
    for leftover in root.iterdir():
        name = leftover.name
        base = name.removesuffix(PARTIAL_SUFFIX).removesuffix(REPLACED_SUFFIX)
        if leftover.is_dir() and name != base and base != protect_tag and TAG_RE.match(base):
            shutil.rmtree(leftover)
            doomed.append(name)
    return doomed


# ------------------------------------------------------------------------------------------- load


def load_checkpoint(engine, ckpt_root: str | os.PathLike, *, tag: str | None = None,
                    restore_rng: bool = True, verify: Verify = "hash", start_over: bool = False) -> dict | None:
    """Resume ``engine`` (module, optimizer and lr-scheduler states) from the newest complete
    checkpoint under ``ckpt_root`` (or ``tag``) and restore this rank's RNG state. Returns the
    client_state given to save_checkpoint, or None when there is no checkpoint yet (fresh start).
    Call on every rank; all ranks load the same one. With ``verify="hash"`` (the default) and no ``tag``, every
    rank hashes a share of the newest checkpoint's files and a corrupted one falls back to the previous complete
    checkpoint (integrity.pick_verified_checkpoint).

    When step folders with a completion marker exist but none passes its check, this raises
    ``NoVerifiedCheckpoint`` (a ValueError naming the folders) instead of returning None, which would train from
    step 0 and overwrite them; ``start_over=True`` (``trainer.start_over``) returns None then, with a warning."""
    root = Path(ckpt_root)
    if tag is not None:
        ref = run_on_rank0(lambda: resolve_checkpoint(root, tag, verify=verify))
    elif verify == "hash":
        ref = pick_verified_checkpoint(root, start_over=start_over)
    else:
        ref, failed = run_on_rank0(scan_checkpoints, root)
        if ref is None:
            refuse_or_start_over(root, failed, start_over)
    if ref is None:
        return None
    world, stage = dist.get_world_size(), int(engine.zero_optimization_stage())
    if ref.marker["world_size"] != world or ref.marker["zero_stage"] != stage:
        raise ValueError(
            f"checkpoint {ref.path} was written by {ref.marker['world_size']} ranks with ZeRO stage "
            f"{ref.marker['zero_stage']}; this run has {world} ranks and stage {stage}. Resume with the same "
            f"world size and zero stage, or export it (python -m ar2diff.export) and start from the export.")
    load_path, state = engine.load_checkpoint(str(root), tag=ref.tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ref.path}")
    if restore_rng:
        rng_path = ref.path / RNG_FILE.format(rank=dist.get_rank())
        restore_rng_state(torch.load(rng_path, weights_only=True))
    return {k: state[k] for k in ref.marker["client_keys"]}
