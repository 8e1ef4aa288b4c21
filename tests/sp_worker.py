"""Worker for tests/test_sequence_parallel.py, run under `torchrun --nproc_per_node 2` (gloo, CPU).

`--mode model`: for each tiny architecture, a TidarLM whose rows are sharded over the 2 ranks (sequence parallel
size 2) against the same TidarLM unsharded in this process: the summed loss shares and the summed gradients.
`--mode engine`: the same through `deepspeed.initialize` (via ar2diff's build_engine) for ZeRO stages, plus the
measured gradient-reduction rule of each stage. `--mode stock`: DeepSpeed's own `register_with_transformers`.
Rank 0 writes a JSON of results to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ar2diff" / "torch_extensions"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tiny import MASK_ID, TINY_CONFIGS, randomize  # noqa: E402

SEQ = 16
BLOCK = 4
ARCHS = {
    "llama": {},
    # look-back 3 (cca_time0=3, cca_time1=2): the halo spans several positions of both streams
    "zaya": {"cca_time0": 3, "cca_time1": 2},
    "qwen3_moe": {"router_aux_loss_coef": 0.1},
}


def batch() -> dict:
    """Two packed rows of SEQ tokens. Row 0: documents of 3, 9 and 4 tokens, so the block [3, 7) ... [7, 11) of the
    second document straddles the shard edge at 8; row 1: one document ending in 2 padding tokens (doc -1)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, MASK_ID, (2, SEQ), generator=g)
    docs = torch.tensor([[0] * 3 + [1] * 9 + [2] * 4, [0] * 14 + [-1] * 2])
    loss_mask = torch.ones(2, SEQ, dtype=torch.bool)
    loss_mask[1, :5] = False  # a prompt without loss, as in SFT
    return {"input_ids": ids, "doc_ids": docs, "loss_mask": loss_mask}


def tidar_model(arch: str, mask_ratio: float = 0.5, diff_target: str = "data", loss_chunk_size: int | None = None):
    from ar2diff.model import TidarLM, build_model
    from ar2diff.objective import DiffTarget, TidarObjective

    lm = randomize(build_model({**TINY_CONFIGS[arch], **ARCHS[arch]}, attn_implementation="sdpa", seed=0), 0)
    target = DiffTarget(diff_target, weight=0.3, temperature=1.5)
    model = TidarObjective(TidarLM(lm, MASK_ID, BLOCK), mask_ratio=mask_ratio,
                           aux_coef=0.1 if arch == "qwen3_moe" else None, loss_chunk_size=loss_chunk_size,
                           diff_target=target)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def rel_errors(got: dict, want: dict) -> dict[str, float]:
    return {n: float((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-30)) for n in want}


def model_mode() -> dict:
    import ar2diff.objective.sharded as sharded
    from ar2diff.model.zaya_halo import Halo
    from ar2diff.trainer.sequence_parallel import sequence_parallel_mpu

    group = sequence_parallel_mpu(2).get_sequence_parallel_group()
    results = {}
    for arch, kwargs in [(arch, {}) for arch in ARCHS] + ALIGNED_CASES:
        key = "/".join([arch, *map(str, kwargs.values())])
        results[key] = compare_sharded(group, lambda arch=arch, kwargs=kwargs: tidar_model(arch, **kwargs), batch(), 2)
    # the previous rank's halo replaced by zeros; each rank's own last clean row in place of the previous rank's
    no_halo = (Halo, "extend", lambda self, x: torch.cat([torch.zeros_like(x[:, self.send_idx]), x], dim=1))
    results["zaya_without_halo_loss"] = _sharded_loss_with(group, "zaya", no_halo)
    own_row = (sharded, "previous_rank_row", lambda row, sp: row.detach())
    results["aligned_without_exchange_loss"] = _sharded_loss_with(group, "llama", own_row, diff_target="ar")
    return results


# drafter-verifier alignment under SP: (arch, tidar_model kwargs); the result key joins the arch and the values
ALIGNED_CASES = [("llama", {"diff_target": "ar"}),
                 ("zaya", {"diff_target": "mix", "loss_chunk_size": 5}),
                 ("qwen3_moe", {"diff_target": "ar", "loss_chunk_size": 3})]


def _sharded_loss_with(group, arch: str, patch: tuple, **kwargs) -> float:
    """Negative controls: the sharded loss (no gradient) with `patch` = (object, attribute, replacement) in place."""
    from ar2diff.trainer.sequence_parallel import install_sequence_parallel

    model = tidar_model(arch, **kwargs)
    install_sequence_parallel(model, group, micro_batch_size=2)
    owner, name, replacement = patch
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        with torch.no_grad():
            loss = model(**batch(), generator=torch.Generator().manual_seed(3)).loss
    finally:
        setattr(owner, name, original)
    dist.all_reduce(loss, group=group)
    return float(loss)


def flex_mode() -> dict:
    """Flex attention as the core of the gathered attention (forward only: torch has no flex backward on CPU),
    against the unsharded SDPA forward. Slow on CPU: transformers compiles flex attention."""
    from ar2diff.trainer.sequence_parallel import sequence_parallel_mpu

    return _flex_forward(sequence_parallel_mpu(2).get_sequence_parallel_group())


def _flex_forward(group) -> dict:
    from ar2diff.model import TidarLM, build_model
    from ar2diff.objective import TidarObjective
    from ar2diff.trainer.sequence_parallel import install_sequence_parallel

    lm = randomize(build_model(TINY_CONFIGS["llama"], attn_implementation="flex_attention", seed=0), 0)
    model = TidarObjective(TidarLM(lm, MASK_ID, BLOCK), mask_ratio=0.5).eval()
    install_sequence_parallel(model, group, micro_batch_size=2)
    with torch.no_grad():
        loss = model(**batch(), generator=torch.Generator().manual_seed(3)).loss
        ref = tidar_model("llama").eval()(**batch(), generator=torch.Generator().manual_seed(3)).loss
    dist.all_reduce(loss, group=group)
    return {"loss": float(loss), "ref_loss": float(ref)}


# Long rows (issue: the suite once checked S = 16 only): one row of LONG tokens whose documents cross every shard
# edge for P = 2 and 4 (1001 + 2900 + 150 tokens, then padding), so blocks straddle the edges too.
LONG = 4096
FLEX_LONG = 8192


def long_batch(seq: int = LONG, seed: int = 11, first: int = 1001) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = [first, seq - first - 150 - 45, 150]
    docs = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)] + [torch.full((45,), -1)])[None]
    return {"input_ids": torch.randint(3, MASK_ID, (1, seq), generator=g), "doc_ids": docs,
            "loss_mask": torch.ones(1, seq, dtype=torch.bool)}


def long_model(arch: str, config: dict | None = None, attn: str = "sdpa", diff_target: str = "data"):
    from ar2diff.model import TidarLM, build_model
    from ar2diff.objective import DiffTarget, TidarObjective

    overrides = {**TINY_CONFIGS[arch], **ARCHS.get(arch, {}), "max_position_embeddings": 2 * FLEX_LONG,
                 **(config or {})}
    lm = randomize(build_model(overrides, attn_implementation=attn, seed=0), 0)
    model = TidarObjective(TidarLM(lm, MASK_ID, BLOCK), mask_ratio=0.5,
                           aux_coef=0.1 if arch == "qwen3_moe" else None,
                           diff_target=DiffTarget(diff_target, weight=0.3, temperature=1.5))
    return model.train()


def compare_sharded(group, make_model, b: dict, micro_batch: int) -> dict:
    """The summed loss shares and gradients of the SP ranks of `group` against the same model unsharded (SDPA core),
    and the logged terms summed as the trainer sums them; `make_model()` builds the model (the same each call)."""
    from ar2diff.trainer.sequence_parallel import install_sequence_parallel, reduce_logged

    reference = make_model()
    ref = reference(**b, generator=torch.Generator().manual_seed(3))
    ref.loss.backward()
    model = make_model()
    install_sequence_parallel(model, group, micro_batch_size=micro_batch)
    out = model(**b, generator=torch.Generator().manual_seed(3))
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=group)
    got = grads(model)
    for g in got.values():
        dist.all_reduce(g, group=group)
    return {"loss": float(loss), "ref_loss": float(ref.loss), "grad_rel": rel_errors(got, grads(reference)),
            "terms": reduce_logged(out.terms.log_dict(), model.sequence_parallel, "cpu"),  # what the trainer logs
            "ref_terms": ref.terms.log_dict(), "ref_aux": float(ref.terms.aux)}


def compare_long(group, arch: str, config: dict | None = None, diff_target: str = "data") -> dict:
    """`compare_sharded` on one row of LONG tokens."""
    return compare_sharded(group, lambda: long_model(arch, config, diff_target=diff_target), long_batch(), 1)


ZAYA_NO_WINDOW = {"cca_time0": 1, "cca_time1": 1}  # convolution window 0: only the delayed value looks back


def long_mode() -> dict:
    """SP = 2 at S = 4096 with the SDPA core: Llama, Qwen3-MoE with the AR diffusion target, ZAYA with a window of
    0 (and, as a control, its halo forced to 0, the old sizing); held-out losses under SP against one rank."""
    import ar2diff.objective.sharded as sharded
    from ar2diff.evaluation.heldout import heldout_losses
    from ar2diff.trainer.sequence_parallel import install_sequence_parallel, sequence_parallel_mpu

    group = sequence_parallel_mpu(2).get_sequence_parallel_group()
    results = {"llama": compare_long(group, "llama"),
               "qwen3_moe/ar": compare_long(group, "qwen3_moe", diff_target="ar"),
               "zaya_window0": compare_long(group, "zaya", ZAYA_NO_WINDOW)}
    original = sharded.halo_length
    sharded.halo_length = lambda lm: 0
    try:
        results["zaya_window0_halo0"] = compare_long(group, "zaya", ZAYA_NO_WINDOW)
    finally:
        sharded.halo_length = original

    second = long_batch(seed=12, first=2999)
    rows = {k: torch.cat([v, second[k]]) for k, v in long_batch().items()}  # two rows, one micro batch each
    reference = long_model("llama").eval()
    model = long_model("llama").eval()
    install_sequence_parallel(model, group, micro_batch_size=1)
    with torch.no_grad():
        results["heldout"] = {"sp": heldout_losses(model, _rows(rows), 1, seed=5),
                              "ref": heldout_losses(reference, _rows(rows), 1, seed=5)}
    return results


def _rows(rows: dict) -> dict:
    """Held-out rows as the data loader gives them: position ids restart at each document (0 on padding)."""
    docs = rows["doc_ids"]
    idx = torch.arange(docs.shape[1]).expand_as(docs)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    start_of = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return {**rows, "position_ids": torch.where(docs >= 0, idx - start_of, 0)}


def flex_long_mode() -> dict:
    """SP = 2, flex core, rows whose documents cross the shard edge: Llama on one row of S = 8192, ZAYA and Qwen3-MoE
    on one of S = 4096; each loss against the unsharded SDPA forward (forward only: no flex backward on CPU)."""
    from ar2diff.trainer.sequence_parallel import install_sequence_parallel, sequence_parallel_mpu

    group = sequence_parallel_mpu(2).get_sequence_parallel_group()
    results = {}
    for arch, seq in (("llama", FLEX_LONG), ("zaya", LONG), ("qwen3_moe", LONG)):
        # a fresh compile per length: after another length dynamo recompiles with symbolic lengths, whose CPU flex
        # kernel inductor (torch 2.13) fails to compile (undeclared split-size variables in the generated C++)
        torch._dynamo.reset()
        b = long_batch(seq)
        model = long_model(arch, attn="flex_attention").eval()
        install_sequence_parallel(model, group, micro_batch_size=1)
        start = time.perf_counter()
        with torch.no_grad():
            loss = model(**b, generator=torch.Generator().manual_seed(3)).loss
            seconds = time.perf_counter() - start
            ref = long_model(arch).eval()(**b, generator=torch.Generator().manual_seed(3)).loss
        dist.all_reduce(loss, group=group)
        results[arch] = {"seq_len": seq, "loss": float(loss), "ref_loss": float(ref), "seconds": seconds}
    return results


def sp4_mode() -> dict:
    """4 ranks, one SP = 4 group: ZAYA with a window of 0 at S = 4096 (model, gradients), and the DeepSpeed engine at
    ZeRO-1 and ZeRO-3 at S = 2048 against one rank (loss and full gradients, scaled as the trainer scales them)."""
    from deepspeed.utils import safe_get_full_grad

    from ar2diff.trainer.engine import EngineConfig, build_engine
    from ar2diff.trainer.schedule import ScheduleConfig
    from ar2diff.trainer.sequence_parallel import loss_scale, sequence_parallel_mpu

    group = sequence_parallel_mpu(4).get_sequence_parallel_group()
    results = {"zaya_window0": compare_long(group, "zaya", ZAYA_NO_WINDOW)}
    b = long_batch(2048, first=601)  # the engine cases at S = 2048 (CI time); edges still cross every shard
    for stage in (1, 3):
        reference = long_model("llama")
        ref = reference(**b, generator=torch.Generator().manual_seed(3))
        ref.loss.backward()
        cfg = EngineConfig(zero_stage=stage, precision="fp32", micro_batch_size=1, sequence_parallel_size=4,
                           activation_checkpointing=True)
        engine = build_engine(long_model("llama"), cfg, ScheduleConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0),
                              total_steps=1)
        out = engine(**b, generator=torch.Generator().manual_seed(3))
        scale = loss_scale(cfg.zero_stage, cfg.reduce_scatter, 4)
        engine.backward(out.loss * scale)
        loss = out.loss.detach().clone()
        dist.all_reduce(loss, group=group)
        got = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        results[f"zero{stage}"] = {"loss": float(loss), "ref_loss": float(ref.loss),
                                   "grad_rel": rel_errors(got, grads(reference)), "sp": engine.sequence_parallel_size}
        engine.destroy()
    return results


# ZeRO stage / reduce-scatter cases measured through deepspeed.initialize (build_engine), SP=2 on 2 ranks.
ENGINE_CASES = [
    {"name": "zero0", "arch": "llama", "zero_stage": 0},
    {"name": "zero1", "arch": "llama", "zero_stage": 1},
    {"name": "zero2", "arch": "llama", "zero_stage": 2},
    {"name": "zero2_no_rs", "arch": "llama", "zero_stage": 2, "reduce_scatter": False},
    {"name": "zero3", "arch": "llama", "zero_stage": 3},
    {"name": "zero3_no_rs", "arch": "llama", "zero_stage": 3, "reduce_scatter": False},
    {"name": "zero1_zaya", "arch": "zaya", "zero_stage": 1},
    {"name": "zero2_qwen3_moe", "arch": "qwen3_moe", "zero_stage": 2},
]


def engine_mode() -> dict:
    """Per case: the measured ratio of DeepSpeed's reduced gradient of the raw loss shares to the unsharded gradient
    (1: summed over the group, 1/P: averaged), and the error of the gradient of the scaled share (what the trainer
    backpropagates) against the unsharded gradient. Full gradients: `safe_get_full_grad` (ZeRO-3 gathers)."""
    from deepspeed.utils import safe_get_full_grad

    from ar2diff.trainer.engine import EngineConfig, build_engine
    from ar2diff.trainer.schedule import ScheduleConfig
    from ar2diff.trainer.sequence_parallel import loss_scale

    results = {}
    for case in ENGINE_CASES:
        b = batch()
        reference = tidar_model(case["arch"])
        reference(**b, generator=torch.Generator().manual_seed(3)).loss.backward()
        want = grads(reference)
        cfg = EngineConfig(zero_stage=case["zero_stage"], reduce_scatter=case.get("reduce_scatter", True),
                           precision="fp32", micro_batch_size=2, sequence_parallel_size=2,
                           activation_checkpointing=True)
        model = tidar_model(case["arch"])
        engine = build_engine(model, cfg, ScheduleConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0), total_steps=1)
        out = engine(**b, generator=torch.Generator().manual_seed(3))
        engine.backward(out.loss)
        got = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        ratios = [float((got[n] * want[n]).sum() / (want[n] * want[n]).sum()) for n in want if want[n].abs().max() > 0]
        scale = loss_scale(cfg.zero_stage, cfg.reduce_scatter, 2)
        results[case["name"]] = {"ratio_min": min(ratios), "ratio_max": max(ratios), "scale": scale,
                                 "grad_rel": rel_errors({n: g * scale for n, g in got.items()}, want),
                                 "dp": engine.dp_world_size, "seq_dp": engine.seq_dp_world_size,
                                 "sp": engine.sequence_parallel_size}
        engine.destroy()
    return results


def stock_mode() -> dict:
    """DeepSpeed's own HF integration on the same q/k/v shards: the TiDAR mask handed to its registered "sdpa" is
    dropped (the output equals the mask-free causal one), while ar2diff's wrapper applies it."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ar2diff.model.sequence_shard import POSITIONS_KWARG, plan_shard, take_meta as _take
    from ar2diff.model.layout import build_tidar_layout
    from ar2diff.model.attention import dense_mask
    from ar2diff.trainer.sequence_parallel import _ulysses_attention, install_sequence_parallel, sequence_parallel_mpu

    b = batch()
    layout = build_tidar_layout(b["input_ids"], MASK_ID, BLOCK, b["doc_ids"])
    plan = plan_shard(SEQ, dist.get_rank(), 2)
    meta = _take(layout.meta, plan.gathered_idx)
    mask = dense_mask(meta)
    positions = layout.position_ids_BL[:, plan.local_idx]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 2 * SEQ, 8, generator=g)[:, :, plan.local_idx] for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    ours_model = tidar_model("llama")
    install_sequence_parallel(ours_model, sequence_parallel_mpu(2).get_sequence_parallel_group(), 2)
    module = ours_model.lm.model.layers[0].self_attn
    ours, _ = _ulysses_attention(module, q, k, v, mask, scaling=8 ** -0.5, **{POSITIONS_KWARG: positions})

    mpu._release_sequence_parallel_groups()
    stock_model = tidar_model("llama")
    UlyssesSPAttentionHF.register_with_transformers(stock_model.lm, "sdpa", 2, 2)
    stock = ALL_ATTENTION_FUNCTIONS["sdpa"]
    stock_masked, _ = stock(module, q, k, v, mask, scaling=8 ** -0.5, position_ids=positions)
    stock_causal, _ = stock(module, q, k, v, None, scaling=8 ** -0.5, position_ids=positions)
    return {"stock_masked_vs_causal": float((stock_masked - stock_causal).abs().max()),
            "stock_vs_ours": float((stock_masked - ours).abs().max())}


MODES = {"model": model_mode, "engine": engine_mode, "stock": stock_mode, "flex": flex_mode, "long": long_mode,
         "flex_long": flex_long_mode, "sp4": sp4_mode}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", required=True, help="comma-separated: model, engine, flex, stock (stock last: it "
                        "changes transformers' global attention table)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from ar2diff.trainer.distributed import init_distributed

    init_distributed()
    torch.set_num_threads(1)
    modes = MODES
    results, seconds = {}, {}
    for mode in args.modes.split(","):
        start = time.perf_counter()
        results[mode] = modes[mode]()
        seconds[mode] = time.perf_counter() - start
    results["seconds"] = seconds
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
