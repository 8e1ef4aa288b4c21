"""Consolidate a DeepSpeed AutoEP (expert-parallel) checkpoint into the plain transformers state dict.

DeepSpeed's ``zero_to_fp32`` cannot do it: under ZeRO-1/2 it concatenates every optimizer param group over all
ranks, but AutoEP's expert groups are partitioned over expert-data-parallel groups only (each EP rank holds other
experts), so it stops on a size mismatch; AutoEP ZeRO-3 checkpoints it refuses outright. This module reads the
fp32 master weights from the per-rank optimizer partitions itself, experts included, and undoes AutoEP's renaming.

What AutoEP did to the model (deepspeed 0.19.8 ``module_inject/auto_ep_layer.py``, ``moe/ep_repack.py``), undone
by ``to_transformers_names`` for the ``fused_3d`` layout of transformers 5.x (Qwen3-MoE, Mixtral)::

    <moe>.gate.weight (E, H)                    -> <moe>.router.gate.weight (E, H)          same tensor
    <moe>.experts.gate_up_proj (E, 2I, H)       -> <moe>.experts.w1 (E/ep, I, H) = gate rows [:I]
                                                   <moe>.experts.w3 (E/ep, I, H) = up rows [I:]
    <moe>.experts.down_proj (E, H, I)           -> <moe>.experts.w2 (E/ep, H, I)

where each EP rank keeps the experts its placement descriptor lists (rank e: ``e*E/ep ... (e+1)*E/ep - 1``).

Where the fp32 weights are (one folder per step; W ranks, no tensor/pipeline parallelism):

- ZeRO-1/2: ``mp_rank_00_model_states.pt`` (rank 0) names every param group's params and shapes
  (``param_shapes``, rank 0's local expert shapes); ``[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` holds
  rank r's slice of every group's flat fp32 buffer. A dense group is split over all W ranks, an expert group over
  the W/ep ranks of one EP rank's expert-data-parallel group (E+D order: ranks e, e+ep, ...; D+E order with
  ``use_data_before_expert_parallelism``: ranks e*W/ep ...). DeepSpeed also writes every expert, in the module
  dtype, to ``layer_{L}_expert_{E}_mp_rank_00_model_states.pt``; the fp32 experts are checked against those.
- ZeRO-0: ``mp_rank_00_model_states.pt`` holds every dense weight (module dtype; there is no fp32 master copy),
  the per-expert files hold the experts.
- ZeRO-3: ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` and ``..._optim_states.pt`` per rank, each param split
  into equal pieces over its sub-group's partition (recorded in ``ds_zero_partition_groups``); expert params are
  partitioned within their EP rank's expert-data-parallel group.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

# transformers model types whose AutoEP round trip has been verified (fused gate_up_proj/down_proj experts, a
# top-k router with a bias-free ``gate``, no shared experts); AutoEP supports more, this converter does not yet.
VERIFIED_MODEL_TYPES = ("qwen3_moe", "mixtral")
EXPERT_WEIGHTS = ("w1", "w2", "w3")
_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_ZERO3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")


def consolidate_autoep_checkpoint(folder: str | os.PathLike, model_type: str,
                                  hf_shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the AutoEP checkpoint in ``folder`` (a DeepSpeed tag folder) under transformers names.

    ``model_type`` is the trained model's ``config.model_type``; ``hf_shapes`` the parameter shapes of the
    transformers model built from that config (to pick the fused expert layout). Keys keep the wrapper prefix the
    engine saw (e.g. ``lm.`` of TidarLM); ``export_layout.strip_wrapper_prefix`` removes it. Raises ValueError
    naming the file or architecture that this converter does not handle.
    """
    folder = Path(folder)
    if model_type not in VERIFIED_MODEL_TYPES:
        raise ValueError(f"{folder}: exporting an AutoEP checkpoint of model_type={model_type!r} is not supported "
                         f"(verified: {', '.join(VERIFIED_MODEL_TYPES)}); its AutoEP weight mapping is unchecked")
    if sorted(folder.glob("zero_pp_rank_*_model_states.pt")):
        state_dict, layers = _zero3_weights(folder)
    elif any(_OPTIM_RE.match(path.name) for path in folder.iterdir()):
        state_dict, layers = _zero12_weights(folder)
    else:
        state_dict, layers = _zero0_weights(folder)
    return to_transformers_names(state_dict, layers, model_type, hf_shapes)


# ------------------------------------------------------------------------------------------------ files


def _load(path: Path) -> dict:
    """A DeepSpeed checkpoint file (pickled DeepSpeed objects inside, hence weights_only=False), memory-mapped."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"cannot read DeepSpeed checkpoint file {path}: {err}") from err


def _rank_files(folder: Path, pattern: re.Pattern, what: str, model_state: dict) -> list[Path]:
    """Files matching ``pattern`` (groups: rank, mp rank) ordered by rank: one per data-parallel rank that
    ``model_state`` records (``dp_world_size``), mp rank 00."""
    world = model_state.get("dp_world_size")
    if not isinstance(world, int):
        raise ValueError(f"{folder}: the model-states file records no dp_world_size (not a DeepSpeed >= 0.19 save)")
    found = {}
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match is None:
            continue
        if int(match.group(2)) != 0:
            raise ValueError(f"{path}: tensor/pipeline-parallel checkpoints (mp_rank != 00) cannot be exported")
        found[int(match.group(1))] = path
    if sorted(found) != list(range(world)):
        raise ValueError(f"{folder}: expected {what} files for ranks 0..{world - 1} (dp_world_size={world}), "
                         f"found ranks {sorted(found)}")
    return [found[rank] for rank in range(world)]


def _autoep_layers(model_state: dict, path: Path) -> list[dict]:
    """AutoEP's per-layer metadata (``ds_autoep_layers``) from a model-states file, validated."""
    layers = model_state.get("ds_autoep_layers")
    if not layers:
        raise ValueError(f"{path} has no ds_autoep_layers metadata: it is not an AutoEP checkpoint (DeepSpeed "
                         "native MoE layers, deepspeed.moe.layer.MoE, cannot be exported)")
    if model_state.get("mp_world_size", 1) != 1:
        raise ValueError(f"{path}: tensor-parallel checkpoints (mp_world_size={model_state['mp_world_size']}) "
                         "cannot be exported")
    for layer in layers:
        placement = layer["expert_placement"]
        listed = sorted(e for entry in placement["ranks"] for e in entry["experts"])
        if listed != list(range(layer["num_experts"])) or placement["ep_size"] != layer["ep_size"]:
            raise ValueError(f"{path}: AutoEP expert placement of {layer['module_path']} does not list every expert "
                             f"once over {layer['ep_size']} EP ranks: {placement}")
    if len({layer["ep_size"] for layer in layers}) != 1:
        raise ValueError(f"{path}: AutoEP layers use different expert-parallel sizes")
    return layers


def _expert_param_names(layers: list[dict]) -> set[str]:
    return {f"{layer['expert_key_prefix']}.{w}" for layer in layers for w in EXPERT_WEIGHTS}


def _local_experts(layers: list[dict], ep_rank: int) -> dict[str, list[int]]:
    """{expert param name: the global expert ids EP rank ``ep_rank`` holds, in its local order}."""
    out = {}
    for layer in layers:
        entry = next(e for e in layer["expert_placement"]["ranks"] if e["rank"] == ep_rank)
        out.update({f"{layer['expert_key_prefix']}.{w}": list(entry["experts"]) for w in EXPERT_WEIGHTS})
    return out


def _place_experts(local: dict[str, dict[int, torch.Tensor]], layers: list[dict]) -> dict[str, torch.Tensor]:
    """Stack every EP rank's local experts (``local[name][ep_rank]``, shape (E_local, ...)) into (E, ...)."""
    out = {}
    ep_size = layers[0]["ep_size"]
    for name, by_rank in local.items():
        if sorted(by_rank) != list(range(ep_size)):
            raise ValueError(f"{name} found for EP ranks {sorted(by_rank)}, expected 0..{ep_size - 1}")
        slots: dict[int, torch.Tensor] = {}
        for ep_rank, tensor in by_rank.items():
            ids = _local_experts(layers, ep_rank)[name]
            if tensor.shape[0] != len(ids):
                raise ValueError(f"{name} of EP rank {ep_rank} holds {tensor.shape[0]} experts, placement says {ids}")
            slots.update({expert: tensor[i] for i, expert in enumerate(ids)})
        out[name] = torch.stack([slots[e] for e in range(len(slots))])
    return out


def _model_extras(model_state: dict, state_dict: dict[str, torch.Tensor]) -> None:
    """Buffers and tied-parameter aliases recorded by DeepSpeed, added to ``state_dict`` in place."""
    for name in model_state.get("buffer_names", []):
        tensor = model_state["module"][name]
        state_dict[name] = tensor.float() if tensor.is_floating_point() else tensor
    for alias, source in model_state.get("shared_params", {}).items():
        if source in state_dict:
            state_dict[alias] = state_dict[source]


# ------------------------------------------------------------------------------------------- ZeRO-0/1/2


def _rank0_model_state(folder: Path) -> tuple[dict, list[dict]]:
    """The one model-states file of a ZeRO-0/1/2 checkpoint, and its AutoEP layers."""
    model_files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if [f.name for f in model_files] != ["mp_rank_00_model_states.pt"]:
        raise ValueError(f"{folder}: expected exactly mp_rank_00_model_states.pt (ZeRO-0/1/2) or zero_pp_rank_*_"
                         f"model_states.pt (ZeRO-3), found {[f.name for f in model_files]}")
    model_state = _load(model_files[0])
    return model_state, _autoep_layers(model_state, model_files[0])


def _expert_file_weights(folder: Path, layers: list[dict]) -> dict[str, torch.Tensor]:
    """Every expert from DeepSpeed's per-expert files (``layer_{moe_layer_id}_expert_{E}_mp_rank_00_model_states
    .pt``, written under ZeRO-0/1/2), stacked to (E, ...) per AutoEP name, in the module dtype."""
    out = {}
    for layer in layers:
        stacks: dict[str, list[torch.Tensor]] = {f"{layer['expert_key_prefix']}.{w}": [] for w in EXPERT_WEIGHTS}
        for expert in range(layer["num_experts"]):
            path = folder / f"layer_{layer['moe_layer_id']}_expert_{expert}_mp_rank_00_model_states.pt"
            if not path.is_file():
                raise ValueError(f"{path} is missing: DeepSpeed writes one file per AutoEP expert under ZeRO-0/1/2")
            saved = _load(path)
            for name, stack in stacks.items():
                if f"{name}.{expert}" not in saved:
                    raise ValueError(f"{path} lacks {name}.{expert}")
                stack.append(saved[f"{name}.{expert}"])
        out.update({name: torch.stack(stack) for name, stack in stacks.items()})
    return out


def _zero0_weights(folder: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Weights of an AutoEP checkpoint without ZeRO: the module's dense weights plus the per-expert files."""
    model_state, layers = _rank0_model_state(folder)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in model_state["module"].items()}
    state_dict.update({k: v.float() for k, v in _expert_file_weights(folder, layers).items()})
    return state_dict, layers


def _zero12_weights(folder: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """fp32 weights (AutoEP names, experts stacked over all EP ranks) of a ZeRO-1/2 AutoEP checkpoint."""
    model_state, layers = _rank0_model_state(folder)
    optim_files = _rank_files(folder, _OPTIM_RE, "optimizer-state", model_state)
    optim = [_load(path)["optimizer_state_dict"] for path in optim_files]
    world, ep_size = len(optim), layers[0]["ep_size"]
    d_before_e = bool((model_state.get("ds_config") or {}).get("use_data_before_expert_parallelism", False))
    expert_names = _expert_param_names(layers)
    frozen = dict(model_state.get("frozen_param_shapes") or {})
    if expert_names & set(frozen):
        raise ValueError(f"{folder}: frozen AutoEP expert weights ({sorted(expert_names & set(frozen))}) are only "
                         "saved for rank 0's experts; unfreeze them to export")
    state_dict = {name: model_state["frozen_param_fragments"][name].float() for name in frozen}
    local: dict[str, dict[int, torch.Tensor]] = {}
    for group, shapes in enumerate(model_state["param_shapes"]):
        kind = _group_kind(shapes, expert_names, folder, group)
        if kind == "dense":
            state_dict.update(_slice_zero12_group([(r, optim[r]) for r in range(world)], group, shapes))
            continue
        for ep_rank in range(ep_size):
            members = _edp_members(ep_rank, world, ep_size, d_before_e)
            ids = _local_experts(layers, ep_rank)
            local_shapes = {n: (len(ids[n]), *tuple(s)[1:]) for n, s in shapes.items()}
            for name, tensor in _slice_zero12_group([(r, optim[r]) for r in members], group, local_shapes).items():
                local.setdefault(name, {})[ep_rank] = tensor
    missing = expert_names - set(local)
    if missing:
        raise ValueError(f"{folder}: expert weights {sorted(missing)} are in no optimizer param group")
    experts = _place_experts(local, layers)
    _check_against_expert_files(folder, layers, experts)
    state_dict.update(experts)
    _model_extras(model_state, state_dict)
    return state_dict, layers


def _group_kind(shapes: Mapping[str, Any], expert_names: set[str], folder: Path, group: int) -> str:
    """'expert' if every param of the optimizer group is an AutoEP expert weight, 'dense' if none is."""
    is_expert = [name in expert_names for name in shapes]
    if is_expert and all(is_expert):
        return "expert"
    if not any(is_expert):
        return "dense"
    raise ValueError(f"{folder}: optimizer param group {group} mixes AutoEP expert and dense weights; DeepSpeed "
                     "MoE param groups (split_params_into_different_moe_groups_for_optimizer) keep them apart")


def _edp_members(ep_rank: int, world: int, ep_size: int, d_before_e: bool) -> list[int]:
    """Global ranks of EP rank ``ep_rank``'s expert-data-parallel group, in partition order (deepspeed
    utils/groups.py ``_create_expert_and_data_parallel``, no model parallelism)."""
    edp = world // ep_size
    if d_before_e:
        return list(range(ep_rank * edp, (ep_rank + 1) * edp))
    return list(range(ep_rank, world, ep_size))


def _slice_zero12_group(members: list[tuple[int, dict]], group: int,
                        shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """Cut one param group's params out of the fp32 flat buffer the ranks ``members`` (in partition order) share.

    ZeRO-1/2 lays a group out as the params in ``shapes`` order, each followed by its alignment padding
    (``param_alignment_paddings``), the whole padded to a multiple of 2 x partitions, split in equal slices.
    """
    for rank, state in members:
        if state["partition_count"][group] != len(members):
            raise ValueError(f"optimizer param group {group} of rank {rank} is split {state['partition_count'][group]}"
                             f" ways, expected {len(members)} (ranks {[r for r, _ in members]}): unexpected layout")
    flat = torch.cat([state["single_partition_of_fp32_groups"][group] for _, state in members])
    paddings = members[0][1].get("param_alignment_paddings")
    paddings = paddings[group] if paddings else [0] * len(shapes)
    out, offset = {}, 0
    for (name, shape), padding in zip(shapes.items(), paddings, strict=True):
        numel = math.prod(shape)
        if offset + numel > flat.numel():
            raise ValueError(f"optimizer param group {group} holds {flat.numel()} values, too few for {name}")
        out[name] = flat.narrow(0, offset, numel).view(tuple(shape)).float()
        offset += numel + padding
    if flat.numel() - offset >= 2 * len(members):
        raise ValueError(f"optimizer param group {group}: {flat.numel() - offset} values left over after its params")
    return out


def _check_against_expert_files(folder: Path, layers: list[dict], experts: dict[str, torch.Tensor]) -> None:
    """The fp32 experts, cast to the module dtype, must equal DeepSpeed's per-expert files: a check that the
    partition layout was read right (module weights are the fp32 master weights rounded to the module dtype)."""
    for name, saved in _expert_file_weights(folder, layers).items():
        if not torch.equal(experts[name].to(saved.dtype), saved):
            raise ValueError(f"{folder}: the per-expert files of {name} differ from its fp32 master weights in the "
                             "optimizer partitions; the checkpoint layout is not what this converter expects")


# ----------------------------------------------------------------------------------------------- ZeRO-3


def _zero3_weights(folder: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """fp32 weights (AutoEP names, experts stacked over all EP ranks) of a ZeRO-3 AutoEP checkpoint."""
    rank0 = _load(folder / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    model_files = _rank_files(folder, _ZERO3_MODEL_RE, "ZeRO-3 model-state", rank0)
    optim_files = _rank_files(folder, _OPTIM_RE, "optimizer-state", rank0)
    pieces: dict[tuple[str, int | None], dict[int, torch.Tensor]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    frozen: dict[str, list[torch.Tensor]] = {}
    first_state, layers = None, None
    for model_path, optim_path in zip(model_files, optim_files):
        model_state = _load(model_path)
        rank_layers = _autoep_layers(model_state, model_path)
        if any(layer.get("checkpoint_format") != "zero3_partitioned" for layer in rank_layers):
            raise ValueError(f"{model_path}: AutoEP layers are not in the zero3_partitioned format this reads")
        ep_ranks = {layer["ep_rank"] for layer in rank_layers}
        if len(ep_ranks) != 1:
            raise ValueError(f"{model_path}: AutoEP layers disagree on this rank's EP rank: {sorted(ep_ranks)}")
        first_state, layers = first_state or model_state, layers or rank_layers
        expert_names, ep_rank = _expert_param_names(rank_layers), ep_ranks.pop()
        for name, fragment in (model_state.get("frozen_param_fragments") or {}).items():
            if name in expert_names:
                raise ValueError(f"{model_path}: frozen AutoEP expert weight {name} cannot be exported")
            frozen.setdefault(name, []).append(fragment)
            shapes[name] = tuple(model_state["frozen_param_shapes"][name])
        optim = _load(optim_path)["optimizer_state_dict"]
        partitions = optim.get("ds_zero_partition_groups")
        if partitions is None or len(partitions) != len(model_state["param_shapes"]):
            raise ValueError(f"{optim_path} lacks ds_zero_partition_groups for its {len(model_state['param_shapes'])}"
                             " sub-groups (written by DeepSpeed >= 0.19 for AutoEP ZeRO-3)")
        for group, group_shapes in enumerate(model_state["param_shapes"]):
            flat, count = optim["fp32_flat_groups"][group], partitions[group]["partition_count"]
            offset = 0
            for name, shape in group_shapes.items():
                size = math.ceil(math.prod(shape) / count)
                key = (name, ep_rank if name in expert_names else None)
                slot = pieces.setdefault(key, {})
                if partitions[group]["partition_rank"] in slot:
                    raise ValueError(f"{optim_path}: {name} partition {partitions[group]['partition_rank']} is also "
                                     "held by another rank; unexpected ZeRO-3 layout")
                slot[partitions[group]["partition_rank"]] = flat.narrow(0, offset, size)
                shapes[name], offset = tuple(shape), offset + size
            if offset != flat.numel():
                raise ValueError(f"{optim_path}: sub-group {group} holds {flat.numel()} values, its params {offset}")
    state_dict = {name: torch.cat(parts).narrow(0, 0, math.prod(shapes[name])).view(shapes[name]).float()
                  for name, parts in frozen.items()}
    local: dict[str, dict[int, torch.Tensor]] = {}
    for (name, ep_rank), parts in pieces.items():
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(f"{folder}: ZeRO-3 partitions of {name} found for partition ranks {sorted(parts)}")
        flat = torch.cat([parts[i] for i in range(len(parts))]).narrow(0, 0, math.prod(shapes[name]))
        tensor = flat.view(shapes[name]).float()
        if ep_rank is None:
            state_dict[name] = tensor
        else:
            local.setdefault(name, {})[ep_rank] = tensor
    state_dict.update(_place_experts(local, layers))
    _model_extras(first_state, state_dict)
    return state_dict, layers


# -------------------------------------------------------------------------------------------- renaming


def _hf_shape(name: str, hf_shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
    """The shape of the transformers parameter that ``name`` (possibly behind a wrapper prefix) ends with."""
    parts = name.split(".")
    for i in range(len(parts)):
        suffix = ".".join(parts[i:])
        if suffix in hf_shapes:
            return tuple(hf_shapes[suffix])
    raise ValueError(f"{name} has no counterpart in the transformers model built from the config")


def to_transformers_names(state_dict: dict[str, torch.Tensor], layers: list[dict], model_type: str,
                          hf_shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """Undo AutoEP's renaming (see the module docstring) for every AutoEP layer; other keys pass unchanged.

    The fused gate/up layout (``[E, 2I, H]`` or the transposed ``[E, H, 2I]``) is read off ``hf_shapes`` with
    DeepSpeed's own ``classify_fused_gate_up_layout``, the function AutoEP used to split it.
    """
    from deepspeed.module_inject.auto_ep_presets.registry import get_preset, preset_name_for_hf_model_type
    from deepspeed.moe.fused_expert_layout import classify_fused_gate_up_layout

    preset = get_preset(preset_name_for_hf_model_type(model_type))
    if preset.expert_storage != "fused_3d" or preset.expert_w3 is not None:
        raise ValueError(f"AutoEP preset of model_type={model_type!r} stores experts as {preset.expert_storage} "
                         f"(w3={preset.expert_w3!r}); only fused gate_up_proj experts are converted")
    out = dict(state_dict)
    for layer in layers:
        moe = layer["module_path"]
        alias = f"{moe}.{preset.router_pattern}."  # AutoEP also registers its router under the HF router's name
        for key in [k for k in out if k.startswith(alias) and f"{moe}.router.{k[len(alias):]}" in out]:
            del out[key]
        for suffix in ("weight", "bias"):
            if f"{moe}.router.gate.{suffix}" in out:
                out[f"{moe}.{preset.router_pattern}.{suffix}"] = out.pop(f"{moe}.router.gate.{suffix}")
        leftover = sorted(k for k in out if k.startswith((f"{moe}.router.", f"{moe}.shared_experts")))
        if leftover:
            raise ValueError(f"AutoEP layer {moe} has weights this converter does not map: {leftover}")
        w1, w2, w3 = (out.pop(f"{layer['expert_key_prefix']}.{w}") for w in EXPERT_WEIGHTS)
        gate_up_name = f"{moe}.{preset.experts_pattern}.{preset.expert_w1}"
        down_name = f"{moe}.{preset.experts_pattern}.{preset.expert_w2}"
        layout = classify_fused_gate_up_layout(_hf_shape(gate_up_name, hf_shapes), _hf_shape(down_name, hf_shapes))
        if layout is None:
            raise ValueError(f"cannot tell the fused expert layout of {gate_up_name} / {down_name} in {model_type}")
        gate_up, down = torch.cat([w1, w3], dim=1), w2  # (E, 2I, H), (E, H, I)
        if layout.needs_transpose:
            gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
        out[gate_up_name], out[down_name] = gate_up, down
    return out
