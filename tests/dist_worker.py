"""Tiny models, data and a training run shared by the engine tests, and the worker the distributed tests launch.

As a script (under ``torchrun --nproc_per_node N``) it runs every run spec in ``--specs`` (a JSON list) one
after another in the same ranks, so a whole set of configurations costs one launch, and rank 0 writes
``{spec name: [global mean loss per step, ...]}`` plus the aux-loss flags to ``--out``.

Data: every step uses the same global batch of ``GLOBAL_BATCH`` random sequences (fixed seed), cut into
``world * grad_accum_steps`` chunks of ``micro_batch_size`` rows; micro-step i of rank r takes chunk
``r * grad_accum_steps + i``. All tokens are labelled, so every chunk's mean-over-tokens loss covers the same
number of tokens and the mean of the chunk means is the global mean. A step's recorded loss is that mean.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ar2diff" / "torch_extensions"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

GLOBAL_BATCH = 4
SEQ_LEN = 16
VOCAB = 128


def tiny_llama():
    """LlamaForCausalLM: hidden 32, 2 layers, vocab 128, seeded so every rank builds the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def tiny_qwen3_moe(aux_coef: float = 0.1):
    """Qwen3MoeForCausalLM: 4 experts, top-2, eager expert loop (HF's grouped_mm default is not for CPU).

    ``norm_topk_prob`` is on, as in released Qwen3-MoE checkpoints and as AutoEP's preset routes. The router
    aux-loss coefficient is large (0.1, default 0.001) so that a router gradient lost under AutoEP would show.
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=VOCAB,
                            max_position_embeddings=64, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                            output_router_logits=True, router_aux_loss_coef=aux_coef,
                            experts_implementation="eager")
    return Qwen3MoeForCausalLM(config)


class Wrapper(torch.nn.Module):
    """An HF model held at ``.lm``, as ar2diff's TiDAR model holds it: AutoEP must still find its MoE layers."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.config = lm.config

    def forward(self, **kwargs):
        return self.lm(**kwargs)


def global_batch() -> torch.Tensor:
    """The fixed global batch of token ids, shape (GLOBAL_BATCH, SEQ_LEN)."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=generator)


# The schedule every run uses: 2 warmup steps, then cosine from 2e-2 to 2e-3 (lrs 1e-2, 2e-2, 2e-2, 1.1e-2, 2e-3).
SCHEDULE = {"name": "cosine", "lr": 2e-2, "min_lr": 2e-3, "warmup_steps": 2}
STEPS = 5


def run(spec: dict) -> dict:
    """Train the spec's model for STEPS optimizer steps.

    Returns per step: the global mean loss, the global grad norm (None under ZeRO-0, which clips without keeping
    the norm), the LR the step used; per micro-step this rank's router aux loss (None for dense models); the
    number of optimizer param groups DeepSpeed marked as MoE groups; whether the HF model checkpoints activations.
    """
    from ar2diff.trainer.engine import EngineConfig, build_engine, find_hf_model
    from ar2diff.trainer.schedule import ScheduleConfig

    engine_cfg = EngineConfig(**spec["engine"])
    model = tiny_qwen3_moe(spec.get("aux_coef", 0.1)) if spec["model"] == "qwen3_moe" else tiny_llama()
    if spec.get("wrap"):
        model = Wrapper(model)
    engine = build_engine(model, engine_cfg, ScheduleConfig(**SCHEDULE), total_steps=STEPS)
    rank, world = dist.get_rank(), dist.get_world_size()
    micro, accum = engine_cfg.micro_batch_size, engine_cfg.grad_accum_steps
    assert micro * accum * world == GLOBAL_BATCH, f"spec {spec['name']}: micro * accum * world != {GLOBAL_BATCH}"
    chunks_BT = global_batch().split(micro)
    result: dict = {"losses": [], "grad_norms": [], "lrs": [], "aux_losses": [],
                    "moe_param_groups": sum(bool(g.get("moe")) for g in engine.basic_optimizer.param_groups),
                    "gradient_checkpointing": find_hf_model(model)[1].is_gradient_checkpointing}
    for _ in range(STEPS):
        result["lrs"].append(engine.get_lr()[0])
        step_loss = torch.zeros(())
        for i in range(accum):
            ids_BT = chunks_BT[rank * accum + i]
            out = engine(input_ids=ids_BT, labels=ids_BT)
            engine.backward(out.loss)
            engine.step()
            step_loss += out.loss.detach() / accum
            aux = getattr(out, "aux_loss", None)
            result["aux_losses"].append(None if aux is None else float(aux.detach()))
        dist.all_reduce(step_loss)
        result["losses"].append(step_loss.item() / world)
        norm = engine.get_global_grad_norm()
        result["grad_norms"].append(None if norm is None else float(norm))
    engine.destroy()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--specs", required=True,
                        help="JSON list of {name, model, engine: {EngineConfig fields}, aux_coef?, wrap?}")
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes the results to")
    args = parser.parse_args()
    from ar2diff.trainer.distributed import init_distributed

    init_distributed()
    results = {spec["name"]: run(spec) for spec in json.loads(args.specs)}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
