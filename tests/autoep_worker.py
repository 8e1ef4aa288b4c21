"""Trains TidarLM-wrapped MoE models with DeepSpeed AutoEP and saves ar2diff checkpoints (tests/test_export_autoep.py).

    torchrun --nproc_per_node N tests/autoep_worker.py OUT [CASE ...]   # N ranks, expert-parallel size 2

Per case (``CASES``: model, ZeRO stage, precision; all of them unless named): build the tiny model (same seed on
every rank), add [MASK] with ``add_mask_token``, wrap it in ``TidarLM``, train ``STEPS`` steps with
``build_engine`` (AutoEP) on per-rank data, write run assets and ``save_checkpoint`` at step ``STEPS`` under
``OUT/<case>``. Rank 0 then writes ``OUT/<case>/expected.pt``, what the export must reproduce:

- ``ar_logits`` / ``diff_logits``: the engine's own TiDAR forward of ``fixed_ids()`` in eval mode, all ranks
  taking part in AutoEP's all-to-all;
- ``params``: every trained dense parameter under AutoEP names, gathered to full size, and ``experts``: the
  experts of each EP rank as ``experts[name][ep_rank]`` (shape (E_local, ...));
- ``initial``: the transformers state dict before training (to show that training moved every weight).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ar2diff" / "torch_extensions"))

import torch  # noqa: E402

_spec = importlib.util.spec_from_file_location("ckpt_worker", Path(__file__).with_name("ckpt_worker.py"))
CKPT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(CKPT)

VOCAB, MASK_ID, BLOCK, RUN_META = CKPT.VOCAB, CKPT.MASK_ID, CKPT.BLOCK, CKPT.RUN_META
EP_SIZE = 2
STEPS = 3
SEQ = 8
# case name -> (model kind, ZeRO stage, precision)
CASES = {"qwen3_moe_z2": ("qwen3_moe", 2, "fp32"), "qwen3_moe_z3": ("qwen3_moe", 3, "fp32"),
         "mixtral_z2": ("mixtral", 2, "fp32"), "qwen3_moe_bf16_z1": ("qwen3_moe", 1, "bf16"),
         "qwen3_moe_bf16_z3": ("qwen3_moe", 3, "bf16"), "qwen3_moe_z0": ("qwen3_moe", 0, "fp32")}


def tiny_moe(kind: str):
    """4 experts, top-2, hidden 32, expert width 16 (gate_up_proj (4, 32, 32) is square: only its position
    in down_proj's shape tells the fused layout apart), eager expert loop (CPU), renormalised top-k (AutoEP's
    router), tied embeddings."""
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_experts_per_tok=2, tie_word_embeddings=True,
                  experts_implementation="eager", output_router_logits=True)
    if kind == "qwen3_moe":
        config = Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=4, head_dim=8,
                                norm_topk_prob=True, **common)
    elif kind == "mixtral":
        config = MixtralConfig(intermediate_size=16, num_local_experts=4, **common)
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def fixed_ids() -> torch.Tensor:
    """(2, 12) ids without the mask id: 3 TiDAR blocks of 4."""
    return (torch.arange(24).reshape(2, 12) * 7) % (VOCAB - 1)


def gathered_params(engine) -> dict:
    """This rank's parameters at full size (ZeRO-3 gathers them), cloned, and its AutoEP EP rank."""
    import deepspeed
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    module = engine.module
    ep_ranks = {m.ep_rank for m in module.modules() if isinstance(m, AutoEPMoELayer)}
    assert len(ep_ranks) == 1, ep_ranks
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        params = {n: p.detach().float().clone() for n, p in module.named_parameters()}
    return {"ep_rank": ep_ranks.pop(), "params": params}


def train_and_save(out: Path, name: str, kind: str, stage: int, precision: str) -> None:
    import deepspeed.comm as dist

    from ar2diff.checkpoint.export_layout import save_run_assets
    from ar2diff.checkpoint.resume import save_checkpoint
    from ar2diff.model import TidarLM, add_mask_token
    from ar2diff.objective import TidarObjective
    from ar2diff.trainer.engine import EngineConfig, build_engine
    from ar2diff.trainer.schedule import ScheduleConfig

    lm, tokenizer = tiny_moe(kind), CKPT.tiny_tokenizer()
    assert add_mask_token(lm, tokenizer, BLOCK) == MASK_ID
    initial = {k: v.clone() for k, v in lm.state_dict().items()}
    engine = build_engine(TidarObjective(TidarLM(lm, MASK_ID, BLOCK)),
                          EngineConfig(zero_stage=stage, precision=precision, micro_batch_size=2,
                                       expert_parallel_size=EP_SIZE, weight_decay=0.01),
                          ScheduleConfig(name="constant", lr=2e-2, warmup_steps=0), total_steps=STEPS)
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        ids_BS = torch.randint(0, VOCAB - 1, (2, SEQ), generator=generator)
        engine.backward(engine(ids_BS).loss)
        engine.step()
    root = out / name
    if rank == 0:
        save_run_assets(root, engine.module.config, tokenizer, RUN_META)
    save_checkpoint(engine, root, step=STEPS, client_state={"tokens_seen": STEPS * 2 * SEQ * world})

    engine.eval()
    with torch.no_grad():
        result = engine(fixed_ids(), return_logits=True)
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, gathered_params(engine))
    if rank == 0:
        experts: dict = {}
        for entry in per_rank:
            for key, tensor in entry["params"].items():
                if ".experts.w" in key:
                    experts.setdefault(key, {})[entry["ep_rank"]] = tensor
        dense = {k: v for k, v in per_rank[0]["params"].items() if k not in experts}
        torch.save({"ar_logits": result.ar_logits.float(), "diff_logits": result.diff_logits.float(),
                    "params": dense, "experts": experts, "initial": initial}, root / "expected.pt")
    dist.barrier()
    engine.destroy()


def main() -> None:
    from ar2diff.trainer.distributed import init_distributed

    out, names = Path(sys.argv[1]), sys.argv[2:] or list(CASES)
    init_distributed()
    for name in names:
        train_and_save(out, name, *CASES[name])


if __name__ == "__main__":
    main()
