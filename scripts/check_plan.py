"""How close `ar2diff.plan` is to measured peak memory: small CPU training steps through DeepSpeed vs the plan.

Each setting runs in its own process: it builds a ZAYA (or Llama) TidarLM from a config, wraps it in the DeepSpeed
engine (ZeRO-1, fp32, torch AdamW, SDPA) and takes three optimizer steps on random tokens. Measured = peak RSS minus
the RSS before the model was built; planned = `plan_memory` of the same shapes (minus the DeepSpeed buckets, which
are capped by the model's size on a model this small). Where Linux lets a process reset its peak
(/proc/self/clear_refs), the peaks of forward + backward and of the optimizer step are also measured apart, over
the steps after the first (which allocates Adam's moments). Prints a table and writes check_plan.json.

    PYTHONPATH=$PWD python scripts/check_plan.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

ARCHS = {
    "zaya": dict(model_type="zaya", hidden_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, moe_intermediate_size=512, num_experts=4, router_hidden_size=64,
                 max_position_embeddings=4096, vocab_size=16000, tie_word_embeddings=True),
    "llama": dict(model_type="llama", hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, intermediate_size=1536, max_position_embeddings=4096, vocab_size=16000),
}
SETTINGS = [  # (arch, seq_len S, activation checkpointing, loss chunk tokens)
    ("zaya", 1024, False, None), ("zaya", 1024, True, None), ("zaya", 1024, True, 256),
    ("llama", 1024, True, 256),
]


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def high_water_bytes() -> int:
    """VmHWM: the peak RSS since the process started or since `reset_high_water`."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_high_water() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(arch: str, seq_len: int, checkpointing: bool, chunk: int | None) -> dict:
    """One setting in this process: peak bytes above the pre-model baseline, and the plan's bytes."""
    import torch

    from ar2diff.model import TidarLM, build_model
    from ar2diff.model.loading import make_config
    from ar2diff.objective import TidarObjective
    from ar2diff.plan.cli import model_shape
    from ar2diff.plan.memory import TrainShape, plan_memory
    from ar2diff.trainer.engine import EngineConfig, build_engine
    from ar2diff.trainer.schedule import ScheduleConfig

    torch.manual_seed(0)
    config = make_config(ARCHS[arch])
    baseline = rss_bytes()
    lm = build_model(config, attn_implementation="sdpa", dtype=torch.float32, seed=0)
    model = TidarObjective(TidarLM(lm, mask_token_id=config.vocab_size - 1, block_size=16), loss_chunk_size=chunk)
    engine_cfg = EngineConfig(zero_stage=1, precision="fp32", micro_batch_size=1,
                              activation_checkpointing=checkpointing)
    engine = build_engine(model, engine_cfg, ScheduleConfig(lr=1e-4), total_steps=10)
    ids = torch.randint(0, config.vocab_size - 1, (1, seq_len), generator=torch.Generator().manual_seed(0))
    phases = {"forward_backward": 0, "step": 0}
    for i in range(3):
        split = i > 0 and reset_high_water()
        out = engine(input_ids=ids)
        engine.backward(out.loss)
        if split:
            phases["forward_backward"] = max(phases["forward_backward"], high_water_bytes() - baseline)
            reset_high_water()
        engine.step()
        if split:
            phases["step"] = max(phases["step"], high_water_bytes() - baseline)
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline, *phases.values())
    train = TrainShape(seq_len=seq_len, layout_factor=2, micro_batch=1, world_size=1, zero_stage=1,
                       precision="fp32", activation_checkpointing=checkpointing, loss_chunk_tokens=chunk,
                       attn_implementation="sdpa", scores_materialized=True)
    plan = plan_memory(model_shape(config), train)
    planned = plan.total - plan.terms["buffers"]
    return {"arch": arch, "seq_len": seq_len, "checkpointing": checkpointing, "loss_chunk_tokens": chunk,
            "measured_mib": peak / 2**20, "planned_mib": planned / 2**20, "plan_over_measured": planned / peak,
            "measured_forward_backward_mib": phases["forward_backward"] / 2**20 or None,
            "measured_step_mib": phases["step"] / 2**20 or None,
            "plan_terms_mib": {k: v / 2**20 for k, v in plan.terms.items()}}


def main() -> None:
    if len(sys.argv) > 1:
        arch, seq, ckpt, chunk = json.loads(sys.argv[1])
        print(json.dumps(measure(arch, seq, ckpt, chunk)))
        return
    rows = []
    print(f"{'arch':<6}{'S':>6}{'ckpt':>6}{'chunk':>7}{'measured MiB':>14}{'fwd+bwd':>9}{'step':>7}"
          f"{'planned MiB':>13}{'plan/meas':>11}")
    for setting in SETTINGS:
        proc = subprocess.run([sys.executable, __file__, json.dumps(setting)], capture_output=True, text=True,
                              check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['arch']:<6}{row['seq_len']:>6}{str(row['checkpointing']):>6}{str(row['loss_chunk_tokens']):>7}"
              f"{row['measured_mib']:>14.0f}{row['measured_forward_backward_mib'] or 0:>9.0f}"
              f"{row['measured_step_mib'] or 0:>7.0f}{row['planned_mib']:>13.0f}{row['plan_over_measured']:>11.2f}")
    Path("check_plan.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
