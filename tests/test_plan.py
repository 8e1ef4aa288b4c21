"""The memory plan: sizes read from the checkpoint's config (meta device), ZeRO/SP/checkpointing/chunking arithmetic,
and the CLI's verdict."""

import json
from dataclasses import replace

import pytest

from ar2diff.model.loading import make_config
from ar2diff.plan.cli import main, model_shape
from ar2diff.plan.memory import TrainShape, activation_bytes, logit_bytes, mask_bytes, plan_memory

MOE = dict(model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
           vocab_size=300, max_position_embeddings=1024)
BASE = TrainShape(seq_len=32768, layout_factor=2, micro_batch=1, world_size=64, zero_stage=1, precision="bf16",
                  activation_checkpointing=True, loss_chunk_tokens=4096)


def test_model_shape_counts_the_real_models_parameters():
    from transformers import AutoModelForCausalLM

    config = make_config(MOE)
    model = AutoModelForCausalLM.from_config(config)
    shape = model_shape(config)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert shape.expert_params == sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert shape.mlp_width == 2 * 32 and shape.qkv_width == (4 + 2 * 2) * 16 and shape.num_layers == 2


def test_zero_stages_partition_what_they_should():
    shape = model_shape(make_config(MOE))
    one = plan_memory(shape, BASE).terms
    two = plan_memory(shape, replace(BASE, zero_stage=2)).terms
    three = plan_memory(shape, replace(BASE, zero_stage=3)).terms
    assert one["weights"] == two["weights"] == 64 * three["weights"]
    assert one["gradients"] == 64 * two["gradients"] and one["optimizer"] == three["optimizer"]
    assert one["optimizer"] == pytest.approx(16 * shape.total_params / 64)
    ep = plan_memory(shape, replace(BASE, expert_parallel=8)).terms
    assert one["weights"] - ep["weights"] == pytest.approx(2 * shape.expert_params * 7 / 8)


def test_sequence_parallel_divides_activations_and_logits_but_not_the_mask():
    shape = model_shape(make_config(MOE))
    sp = replace(BASE, sequence_parallel=4)
    assert activation_bytes(shape, BASE, True) == pytest.approx(4 * activation_bytes(shape, sp, True))
    assert logit_bytes(shape, BASE, None) == 4 * logit_bytes(shape, sp, None)
    assert mask_bytes(sp) == mask_bytes(BASE)
    assert activation_bytes(shape, BASE, False) > activation_bytes(shape, BASE, True)
    assert logit_bytes(shape, BASE, 4096) * 16 == logit_bytes(shape, BASE, None)
    assert mask_bytes(replace(BASE, attn_implementation="sdpa")) > 1000 * mask_bytes(BASE)
    # without SP the TiDAR layout's SDPA is split and skips the clean x draft quarter; SP passes the whole mask
    sdpa = replace(BASE, attn_implementation="sdpa")
    assert mask_bytes(replace(sdpa, sequence_parallel=2)) == pytest.approx(mask_bytes(sdpa) * 4 / 3)
    assert mask_bytes(replace(BASE, attn_implementation="eager")) == mask_bytes(replace(sdpa, sequence_parallel=2))


def test_cli_reads_the_checkpoint_config_and_says_whether_it_fits(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(MOE))
    args = ["recipe=tidar_midtrain", f"model.path={tmp_path}", "world_size=64", "hardware=mi300x"]
    assert main(args) == 0
    out = capsys.readouterr().out
    n = model_shape(make_config(MOE)).total_params
    assert f"{n / 1e9:.2f}B parameters" in out and "fits" in out and "activations (no checkpointing)" in out
    big = dict(MOE, hidden_size=4096, num_hidden_layers=48, num_attention_heads=32, head_dim=128,
               moe_intermediate_size=4096, vocab_size=150000)
    (tmp_path / "config.json").write_text(json.dumps(big))
    assert main(["recipe=context_extension", f"model.path={tmp_path}", "world_size=8", "hardware=h100"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_training_start_refuses_a_config_whose_plan_exceeds_the_device(tmp_path):
    """The check PhaseTrainer.setup runs on an accelerator, before any model is built: the plan against the
    device's memory, with the numbers and the way out in the message."""
    from ar2diff.config.compose import compose
    from ar2diff.plan.cli import PlanDoesNotFitError
    from ar2diff.plan.fits import HEADROOM, check_plan_fits

    (tmp_path / "config.json").write_text(json.dumps(MOE))
    cfg = compose(["recipe=tidar_midtrain", f"model.path={tmp_path}", "data.sources.0.path=unused"])
    planned = check_plan_fits(cfg, 8, capacity_bytes=2**40, device="cuda")  # 1 TiB: fits
    assert planned > 0
    with pytest.raises(PlanDoesNotFitError) as err:
        check_plan_fits(cfg, 8, capacity_bytes=planned / (1 - HEADROOM) * 0.99, device="cuda")
    message = str(err.value)
    assert f"needs {planned / 2**30:.1f} GiB per rank" in message and "trainer.memory_plan_check=false" in message
    check_plan_fits(cfg, 8, capacity_bytes=planned / (1 - HEADROOM) * 1.01, device="cuda")  # just fits
