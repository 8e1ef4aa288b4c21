"""Every recipe and config group composes; bad values fail at start-up naming the key; budget arithmetic."""

from pathlib import Path

import pytest

from ar2diff.config.budget import plan_budget
from ar2diff.config.compose import compose
from ar2diff.trainer.phase import phase_budget

CONF = Path(__file__).parents[1] / "conf"
RECIPES = Path(__file__).parents[1] / "recipes"
CLUSTER = ["model.path=/ckpt/ZAYA1-8B", "data.sources.0.path=/data/*.jsonl"]
PIPELINE_INPUTS = ["inputs.pretrain_data=/data/pre/*.jsonl", "inputs.chat_data=/data/chat/*.jsonl"]


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_recipe_composes_and_validates(recipe):
    embedded = recipe in ("ar_pretrain", "quickstart")  # run on the embedded default: nothing to point at
    inputs = PIPELINE_INPUTS if recipe == "tidar_pipeline" else []
    cfg = compose([f"recipe={recipe}", *([] if embedded else CLUSTER), *inputs])
    cfg.validate(world_size=1 if embedded else 64)
    assert cfg.name == recipe
    previous = None
    for phase in cfg.pipeline:  # each phase composes with its own overrides, from the previous phase's export
        extra = [f"model.path={previous}"] if previous else ([] if embedded else CLUSTER[:1])
        sub = compose([f"recipe={phase.recipe}", *phase.overrides, *extra])
        assert "${" not in " ".join(phase.overrides)  # the pipeline's inputs were interpolated
        sub.validate(world_size=1)
        previous = "/run/previous/export"


@pytest.mark.parametrize("group", sorted(p.name for p in CONF.iterdir() if p.is_dir()))
def test_every_config_group_option_composes(group):
    for option in sorted((CONF / group).glob("*.yaml")):
        cfg = compose([f"{group}={option.stem}", *CLUSTER, "data.chat=true" if "chat" in option.stem else "seed=0",
                       "phase=diffusion_sft" if "chat" in option.stem else "seed=0"])
        assert cfg is not None


def test_readme_overrides_compose():
    """The commands the README shows."""
    cfg = compose(["recipe=tidar_midtrain", *CLUSTER, "objective.alpha=2.0", "objective.block_size=8",
                   "objective.mask_ratio=0.5", "deepspeed=zero3_ep", "deepspeed.expert_parallel_size=8",
                   "schedule=wsd", "logger.mode=online"])
    assert (cfg.objective.alpha, cfg.objective.block_size, cfg.objective.mask_ratio) == (2.0, 8, 0.5)
    assert cfg.deepspeed.zero_stage == 3 and cfg.schedule.name == "wsd"
    cfg.validate(world_size=64)
    aligned = compose(["recipe=tidar_midtrain", *CLUSTER, "objective.diff_target=mix", "objective.diff_target_weight=0.3",
                       "objective.diff_target_temperature=2.0"]).validate(world_size=64).objective
    assert (aligned.diff_target, aligned.diff_target_weight, aligned.diff_target_temperature) == ("mix", 0.3, 2.0)


def test_real_recipe_budgets():
    mid = compose(["recipe=tidar_midtrain", *CLUSTER])
    b = phase_budget(mid, world_size=64)
    assert (b.seq_len, b.global_batch_size, b.grad_accum_steps) == (32768, 256, 4)
    assert b.steps == 71526 == -(-600_000_000_000 // (256 * 32768))
    ext = compose(["recipe=context_extension", *CLUSTER])
    b = phase_budget(ext, world_size=64)
    assert (b.seq_len, b.steps) == (131072, -(-500_000_000_000 // (64 * 131072)))
    assert ext.model.rope == {"rope_theta": 5_000_000} and ext.model.max_position_embeddings == 131072
    assert "71,526 steps" in phase_budget(mid, 64).describe()


@pytest.mark.parametrize("overrides,message", [
    (["objective.block_size=512"], "objective.block_size=512 does not fit data.seq_len=256"),
    (["objective.mask_ratio=0"], "objective.mask_ratio"),
    (["objective.kind=ar"], "does not fit phase"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage=4"),
    (["deepspeed.expert_parallel_size=3"], "deepspeed.expert_parallel_size=3 must divide"),
    (["schedule.min_lr=1.0"], "schedule.min_lr"),
    (["data.sources.0.kind=web"], "data.sources[0].kind"),
    (["model.path=/x"], "set exactly one of model.path"),
    (["decoder.mix_weights=[1.5]"], "decoder.mix_weights"),
    (["objective.diff_target=teacher"], "objective.diff_target='teacher'"),
    (["objective.diff_target=mix", "objective.diff_target_weight=2"], "objective.diff_target_weight=2"),
])
def test_validation_names_the_key(overrides, message):
    cfg = compose(overrides)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cfg.validate(world_size=2)


def test_typos_and_missing_values_fail_at_composition():
    with pytest.raises(Exception, match="objective.alhpa"):
        compose(["objective.alhpa=2"])
    with pytest.raises(ValueError, match="'objective.alhpa'"):
        compose(["+objective.alhpa=2"])
    # the recipe's required values (model.path, the data path) are named before any work, at validation: the typed
    # schema under conf/ keeps a default where the YAML says '???'
    with pytest.raises(ValueError, match="model.path"):
        compose(["recipe=tidar_midtrain"]).validate()
    with pytest.raises(ValueError, match=r"data.sources\[0\].path is empty"):
        compose(["recipe=tidar_midtrain", "model.path=/x"]).validate()


def test_budget_errors_name_the_key():
    with pytest.raises(ValueError, match="budget.global_batch_size=10 is not a multiple"):
        plan_budget(10**6, 128, 10, micro_batch_size=4, data_parallel_size=1)
    with pytest.raises(ValueError, match="below one optimizer step"):
        plan_budget(1000, 128, 8, micro_batch_size=4, data_parallel_size=2)
    b = plan_budget(10**6, 128, 8, micro_batch_size=2, data_parallel_size=2)
    assert (b.grad_accum_steps, b.steps) == (2, -(-10**6 // 1024))


def test_pipeline_overrides_reach_the_shared_phases_only(monkeypatch, tmp_path):
    """The quickstart states its per-phase settings once (`pipeline_overrides`); ar_pretrain (shared: false) keeps
    building from scratch, every TiDAR phase gets them before its own overrides."""
    from types import SimpleNamespace

    import ar2diff.pipeline as T

    monkeypatch.setattr(T, "init_distributed", lambda: SimpleNamespace(rank=0, world_size=1))
    plan = T.plan_pipeline(compose(["recipe=quickstart"]), [], tmp_path)
    (pre, _, pre_overrides), *tidar = plan
    assert pre.model.config is not None and not any(o.startswith("model=hf") for o in pre_overrides)
    for phase_cfg, _, overrides in tidar:
        assert overrides[1:10] == compose(["recipe=quickstart"]).pipeline_overrides
        assert (phase_cfg.model.attn_implementation, phase_cfg.objective.block_size, phase_cfg.decoder.num_prompts,
                phase_cfg.deepspeed.zero_stage) == ("sdpa", 8, 24, compose(["deepspeed=cpu"]).deepspeed.zero_stage)
    assert [p.data.seq_len for p, _, _ in tidar] == [256, 512, 256]


def test_cpu_bf16_detection_reads_the_flags_line():
    from ar2diff.dtypes import cpu_bf16, cpu_flags

    amx = "processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_tile amx_bf16 avx512_bf16\nbogomips\t: 1\n"
    assert cpu_bf16(amx) == (True, "CPU bf16: fast (amx_bf16, avx512_bf16)")
    assert cpu_bf16("flags\t: fpu sse2 avx2 fma\n")[0] is False
    assert "slow" in cpu_bf16("flags\t: fpu sse2 avx2 fma\n")[1]
    assert cpu_bf16("Features\t: fp asimd bf16\n")[0] is False  # an ARM line: no x86 bf16 flag
    assert cpu_flags("model name\t: x\n") == set() and cpu_bf16("")[0] is False
