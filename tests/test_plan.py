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
    assert one["optimizer"] == pytest.approx(12 * shape.total_params / 64)  # fp32 master, two moments
    # the step's fp32 gradient partition and the foreach kernel's one temporary (two on CPU: single-tensor AdamW)
    assert one["optimizer step"] == pytest.approx(8 * shape.total_params / 64)
    assert plan_memory(shape, replace(BASE, device="cpu")).terms["optimizer step"] == pytest.approx(
        12 * shape.total_params / 64)
    ep = plan_memory(shape, replace(BASE, expert_parallel=8)).terms
    assert one["weights"] - ep["weights"] == pytest.approx(2 * shape.expert_params * 7 / 8)


def test_sequence_parallel_divides_activations_and_logits_but_not_the_mask():
    shape = model_shape(make_config(MOE))
    sp = replace(BASE, sequence_parallel=4)
    assert activation_bytes(shape, BASE, True) == pytest.approx(4 * activation_bytes(shape, sp, True))
    assert logit_bytes(shape, BASE, None) == 4 * logit_bytes(shape, sp, None)
    assert mask_bytes(sp) == mask_bytes(BASE)
    assert activation_bytes(shape, BASE, False) > activation_bytes(shape, BASE, True)
    # one chunk of 4096 rows: its logits (bf16), log-softmax, working copy and gradient (fp32)
    assert logit_bytes(shape, BASE, 4096) == 4096 * shape.vocab_size * (2 + 12)
    assert mask_bytes(replace(BASE, attn_implementation="sdpa")) > 100 * mask_bytes(BASE)
    # the TiDAR layout's SDPA is split (also under SP, whose core attention runs in layout order): S^2 for the clean
    # queries plus each run's rows by its columns, well under the dense (2S)^2 that eager takes
    sdpa = replace(BASE, attn_implementation="sdpa")
    assert mask_bytes(replace(sdpa, sequence_parallel=2)) == mask_bytes(sdpa)
    assert 0.25 < mask_bytes(sdpa) / mask_bytes(replace(BASE, attn_implementation="eager")) < 0.5


def test_the_peak_is_the_larger_phase_and_the_loss_and_a_layer_backward_do_not_stack():
    shape = model_shape(make_config(MOE))
    plan = plan_memory(shape, replace(BASE, loss_chunk_tokens=None))
    t = plan.terms
    states = t["weights"] + t["gradients"] + t["optimizer"] + t["buffers"]
    kept = t["activations"] + t["mask"]
    assert plan.forward_backward == pytest.approx(states + kept + max(t["logits"] + t["teacher logits"],
                                                                      t["layer backward"]))
    assert plan.step == pytest.approx(states + t["optimizer step"])
    assert plan.total == max(plan.forward_backward, plan.step)
    teacher = plan_memory(shape, replace(BASE, loss_chunk_tokens=None, diff_target="ar")).terms["teacher logits"]
    draft_rows = BASE.seq_len * BASE.mask_ratio
    assert teacher == draft_rows * shape.vocab_size * (2 + 4) and t["teacher logits"] == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "zaya"])
def test_the_activation_terms_count_the_tensors_autograd_saves(arch):
    """The plan's per-layer activations (written from each architecture's modules) against the tensors autograd
    really saves in one decoder layer of a TiDAR forward (split SDPA), counted once per storage, the mask apart."""
    import torch

    from ar2diff.model import TidarLM, build_model
    from ar2diff.objective import TidarObjective
    from ar2diff.plan.memory import attention_elements, layer_activation_elements
    from tiny import TINY_CONFIGS

    S = 512
    config = dict(TINY_CONFIGS[arch], hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128, max_position_embeddings=2 * S)
    lm = build_model(config, seed=0)
    objective = TidarObjective(TidarLM(lm, config["vocab_size"] - 1, 16), mask_ratio=0.5)
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    seen, recording = {}, []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if recording and ptr not in params and ptr not in seen:
            seen[ptr] = (t.untyped_storage().nbytes(), t.dim() == 4 and t.shape[1] == 1)  # (B, 1, Q, K): the mask
        return t

    layer = lm.get_decoder().layers[1]
    layer.register_forward_pre_hook(lambda *a: recording.append(1))
    layer.register_forward_hook(lambda *a: recording.clear())
    ids = torch.randint(3, config["vocab_size"] - 1, (1, S), generator=torch.Generator().manual_seed(0))
    docs = torch.zeros(1, S, dtype=torch.long)
    docs[0, S // 3:], docs[0, S - 20:] = 1, -1
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        objective(ids, docs, generator=torch.Generator().manual_seed(0))
    saved = sum(nbytes for nbytes, is_mask in seen.values() if not is_mask)
    shape = model_shape(lm.config)
    train = TrainShape(seq_len=S, layout_factor=2, micro_batch=1, world_size=1, zero_stage=0, precision="fp32",
                       attn_implementation="sdpa", mask_ratio=0.5)
    planned = 2 * S * 4 * (layer_activation_elements(shape, train) + attention_elements(shape, train))
    assert planned / saved == pytest.approx(1.0, abs=0.12), (planned, saved)


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
