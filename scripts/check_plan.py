"""How close `ar2diff.plan` is to measured peak memory: small CPU training steps through DeepSpeed vs the plan.

Each row runs in its own process: a tiny Llama, Qwen3-MoE or ZAYA TidarLM (fp32, SDPA), wrapped in the DeepSpeed
engine as the trainer wraps it (ZeRO-1, torch AdamW), three optimizer steps on one packed row of S tokens.
Measured = the peak RSS above the RSS before the model was built, with glibc told to map every allocation of 64 KiB
or more on its own (`MALLOC_MMAP_THRESHOLD_`), so a freed tensor leaves the RSS at once and the peak is the peak of
live memory. The peaks of forward + backward and of the optimizer step are also measured apart (Linux lets a
process reset its peak through /proc/self/clear_refs), over the steps after the first, which allocates Adam's
moments. Planned = `plan_memory` of the same shapes.

The rows marked held out were not looked at while the plan's terms were written; they are reported apart.

    PYTHONPATH=$PWD python scripts/check_plan.py [--out check_plan.json] [--rows 0,3,...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

COMMON = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=8192, vocab_size=8192)
ARCHS = {
    "llama": dict(model_type="llama", intermediate_size=768, **COMMON),
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=768, moe_intermediate_size=256, head_dim=64,
                      num_experts=8, num_experts_per_tok=2, **COMMON),
    "zaya": dict(model_type="zaya", head_dim=64, moe_intermediate_size=512, num_experts=4, router_hidden_size=64,
                 tie_word_embeddings=True, **COMMON),
}
# (arch, S, activation checkpointing, loss chunk tokens, diff_target, held out)
ROWS = [
    ("llama", 2048, False, None, "data", False),
    ("llama", 2048, True, None, "data", False),
    ("llama", 2048, True, 512, "data", False),
    ("zaya", 2048, False, None, "data", False),
    ("zaya", 2048, True, 512, "data", False),
    ("qwen3_moe", 2048, False, None, "data", False),
    ("qwen3_moe", 2048, True, None, "ar", False),
    ("llama", 4096, True, None, "ar", False),
    ("llama", 4096, False, 512, "data", True),
    ("zaya", 4096, True, None, "ar", True),
    ("qwen3_moe", 4096, True, 512, "data", True),
    ("zaya", 4096, False, 512, "ar", True),
]
MMAP_THRESHOLD = 65536


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def high_water_bytes() -> int:
    """VmHWM: the peak RSS since the process started or since `reset_high_water`."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_high_water() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def packed_row(seq_len: int, vocab: int):
    """One row: three documents (edges mid-block), then 37 padding tokens."""
    import torch

    ids = torch.randint(3, vocab - 1, (1, seq_len), generator=torch.Generator().manual_seed(0))
    docs = torch.zeros(1, seq_len, dtype=torch.long)
    docs[0, seq_len // 3 + 5:], docs[0, 2 * seq_len // 3 + 3:], docs[0, seq_len - 37:] = 1, 2, -1
    return {"input_ids": ids, "doc_ids": docs}


def measure(arch: str, seq_len: int, checkpointing: bool, chunk: int | None, diff_target: str) -> dict:
    """One row in this process: peak bytes above the pre-model baseline (whole, forward + backward, step) and the
    plan's terms."""
    import torch

    from ar2diff.model import TidarLM, build_model
    from ar2diff.model.params import model_shape
    from ar2diff.model.loading import make_config
    from ar2diff.objective import DiffTarget, TidarObjective
    from ar2diff.plan.memory import TrainShape, plan_memory
    from ar2diff.trainer.engine import EngineConfig, build_engine
    from ar2diff.trainer.schedule import ScheduleConfig

    torch.manual_seed(0)
    config = make_config(ARCHS[arch])
    batch = packed_row(seq_len, config.vocab_size)
    reset_high_water()
    baseline = rss_bytes()
    lm = build_model(config, attn_implementation="sdpa", dtype=torch.float32, seed=0)
    model = TidarObjective(TidarLM(lm, mask_token_id=config.vocab_size - 1, block_size=16), mask_ratio=0.5,
                           loss_chunk_size=chunk, diff_target=DiffTarget(diff_target))
    engine_cfg = EngineConfig(zero_stage=1, precision="fp32", micro_batch_size=1,
                              activation_checkpointing=checkpointing)
    engine = build_engine(model, engine_cfg, ScheduleConfig(lr=1e-4), total_steps=10)
    phases = {"forward_backward": 0, "step": 0}
    for i in range(3):
        if i > 0:
            reset_high_water()
        out = engine(**batch, generator=torch.Generator().manual_seed(i))
        engine.backward(out.loss)
        if i > 0:
            phases["forward_backward"] = max(phases["forward_backward"], high_water_bytes() - baseline)
            reset_high_water()
        engine.step()
        if i > 0:
            phases["step"] = max(phases["step"], high_water_bytes() - baseline)
    peak = max(phases.values())
    train = TrainShape(seq_len=seq_len, layout_factor=2, micro_batch=1, world_size=1, zero_stage=1,
                       precision="fp32", activation_checkpointing=checkpointing, loss_chunk_tokens=chunk,
                       attn_implementation="sdpa", diff_target=diff_target, device="cpu", mask_ratio=0.5,
                       block_size=16)
    plan = plan_memory(model_shape(lm), train)
    return {"arch": arch, "seq_len": seq_len, "checkpointing": checkpointing, "loss_chunk_tokens": chunk,
            "diff_target": diff_target, "measured_mib": peak / 2**20, "planned_mib": plan.total / 2**20,
            "plan_over_measured": plan.total / peak,
            "measured_forward_backward_mib": phases["forward_backward"] / 2**20,
            "measured_step_mib": phases["step"] / 2**20,
            "planned_forward_backward_mib": plan.forward_backward / 2**20, "planned_step_mib": plan.step / 2**20,
            "plan_terms_mib": {k: v / 2**20 for k, v in plan.terms.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="check_plan.json")
    parser.add_argument("--rows", default="", help="comma-separated row indices (default: all)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # one row, in a subprocess
    args = parser.parse_args()
    if args.row is not None:
        print(json.dumps(measure(*ROWS[int(args.row)][:5])))
        return
    chosen = [int(i) for i in args.rows.split(",") if i] or list(range(len(ROWS)))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    print(f"{'':3}{'arch':<10}{'S':>6}{'ckpt':>6}{'chunk':>6}{'target':>7}{'measured MiB':>13}{'fwd+bwd':>9}"
          f"{'step':>7}{'planned MiB':>12}{'fwd+bwd':>9}{'step':>7}{'plan/meas':>10}", flush=True)
    rows = []
    for i in chosen:
        proc = subprocess.run([sys.executable, __file__, "--row", str(i)], capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"row {i} failed:\n{proc.stderr[-3000:]}")
        row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "held_out": ROWS[i][5], "index": i}
        rows.append(row)
        print(f"{'*' if row['held_out'] else '':>2} {row['arch']:<10}{row['seq_len']:>6}{str(row['checkpointing']):>6}"
              f"{str(row['loss_chunk_tokens']):>6}{row['diff_target']:>7}{row['measured_mib']:>13.0f}"
              f"{row['measured_forward_backward_mib']:>9.0f}{row['measured_step_mib']:>7.0f}"
              f"{row['planned_mib']:>12.0f}{row['planned_forward_backward_mib']:>9.0f}{row['planned_step_mib']:>7.0f}"
              f"{row['plan_over_measured']:>10.2f}", flush=True)
    for label, held in (("rows used while writing the plan", False), ("held-out rows", True)):
        ratios = [r["plan_over_measured"] for r in rows if r["held_out"] == held]
        if ratios:
            print(f"{label}: plan/measured {min(ratios):.2f}-{max(ratios):.2f}")
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
