"""Exports of expert-parallel (DeepSpeed AutoEP) checkpoints equal the trained AutoEP model.

One torchrun launch (2 gloo ranks, expert-parallel size 2; tests/autoep_worker.py) trains a tiny TidarLM-wrapped
MoE per case for 3 steps (ZeRO-0/1/2/3, fp32 and bf16, Qwen3-MoE and Mixtral), saves an ar2diff checkpoint, and
records the engine's own TiDAR logits on a fixed batch and every trained weight gathered from both EP ranks.
The export (``python -m ar2diff.export``) must load with transformers alone and:

- hold exactly the trained weights, renamed back by a mapping written out here, independently of the converter:
  the router ``router.gate`` is transformers' ``gate``; ``gate_up_proj[e] = cat(w1, w3)[e]`` (gate rows first,
  as Qwen3MoeExperts/MixtralExperts chunk it) and ``down_proj[e] = w2[e]``, expert e living on EP rank e // 2.
  bf16 runs export the fp32 master weights: they round to the trained bf16 weights and keep more precision;
- give the engine's logits on the fixed batch, both the AR and the diffusion stream (fp32 runs, atol 1e-4).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ar2diff.checkpoint.export_layout import read_metadata
from ar2diff.checkpoint.resume import resolve_checkpoint
from ar2diff.checkpoint.autoep import _edp_members, consolidate_autoep_checkpoint
from ar2diff.checkpoint.export import consolidated_state_dict
from ar2diff.export import main
from ar2diff.model import TidarLM
from launch import failure_log, run_ranks  # noqa: E402

_spec = importlib.util.spec_from_file_location("autoep_worker", Path(__file__).with_name("autoep_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)
REPO = Path(__file__).resolve().parents[1]
TAG = f"step_{W.STEPS:08d}"


def launch(out: Path, nproc: int, *cases: str) -> Path:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "tests" / "autoep_worker.py"), str(out), *cases]
    proc = run_ranks(cmd, cwd=REPO, env=W.CKPT.subprocess_env(), timeout=300)
    assert proc.returncode == 0, failure_log(proc)
    return out


RANK_JOBS = {"autoep": {"cases": list(W.CASES)}}  # for the rank_jobs fixture (tests/conftest.py)


@pytest.fixture(scope="module")
def trained(rank_jobs) -> Path:
    """Every case of autoep_worker.CASES on 2 ranks, from the session's one 2-rank launch."""
    return rank_jobs / "autoep"


def expected_transformers_weights(expected: dict) -> dict[str, torch.Tensor]:
    """The trained weights (AutoEP names, ``lm.`` prefix of TidarLM) under transformers' names and layout."""
    out = {k.removeprefix("lm.").replace(".mlp.router.gate.", ".mlp.gate."): v for k, v in expected["params"].items()}
    for w1_name in [k for k in expected["experts"] if k.endswith(".w1")]:
        moe = w1_name.removeprefix("lm.").removesuffix(".w1")  # model.layers.L.mlp.experts
        w1, w2, w3 = (torch.cat([by_rank[r] for r in sorted(by_rank)])  # EP rank r holds experts 2r, 2r+1
                      for by_rank in (expected["experts"][w1_name[:-1] + w] for w in "123"))
        out[f"{moe}.gate_up_proj"], out[f"{moe}.down_proj"] = torch.cat([w1, w3], dim=1), w2
    return out


def check_export(dest: Path, expected: dict, precision: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(dest).eval()
    params, want = dict(model.named_parameters()), expected_transformers_weights(expected)
    assert params.keys() == want.keys()
    for name, tensor in params.items():
        assert tensor.dtype == torch.float32, name
        assert not torch.equal(tensor, expected["initial"][name]), f"{name} was not trained"
        if precision == "fp32":
            assert torch.equal(tensor, want[name]), name
        else:  # fp32 master weights: they round to the trained bf16 weights
            assert torch.equal(tensor.bfloat16().float(), want[name]), name
    if precision == "bf16":
        assert any(not torch.equal(t, t.bfloat16().float()) for t in params.values())
        return
    with torch.no_grad():
        plain_logits = model(input_ids=W.fixed_ids()).logits
        tidar = TidarLM(model, W.MASK_ID, W.BLOCK)(W.fixed_ids())
    torch.testing.assert_close(plain_logits, expected["ar_logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(tidar.ar_logits, expected["ar_logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(tidar.diff_logits, expected["diff_logits"], rtol=0, atol=1e-4)


@pytest.mark.dist
@pytest.mark.parametrize("case", list(W.CASES))
def test_export_equals_trained_autoep_model(trained, tmp_path, case):
    kind, _, precision = W.CASES[case]
    dest = tmp_path / "export"
    assert main(["--checkpoint", str(trained / case), "--out", str(dest)]) == 0
    check_export(dest, torch.load(trained / case / "expected.pt"), precision)
    config = AutoModelForCausalLM.from_pretrained(dest).config
    assert (config.model_type, config.mask_token_id, config.tidar_block_size) == (kind, W.MASK_ID, W.BLOCK)
    assert AutoTokenizer.from_pretrained(dest).mask_token_id == W.MASK_ID
    assert {k: read_metadata(dest)[k] for k in ("step", "tokens_seen")} == {"step": W.STEPS, "tokens_seen": 96}


@pytest.mark.dist
def test_export_with_expert_data_parallel_groups(tmp_path):
    """4 ranks, expert-parallel size 2: each EP rank's experts are split over an expert-data-parallel group of
    2 ranks (ranks e and e + 2), which the 2-rank launch cannot show.

    It once failed with a rank hashing a peer's RNG file before the peer had written it: ar2diff's save barrier
    shared the default process group with DeepSpeed's own save collectives and could pair with one of them.
    The checkpoint coordination now runs on its own gloo group (checkpoint/coordination.py)."""
    out = launch(tmp_path / "runs", 4, "qwen3_moe_z2", "qwen3_moe_z3")
    for case in ("qwen3_moe_z2", "qwen3_moe_z3"):
        assert main(["--checkpoint", str(out / case), "--out", str(tmp_path / case)]) == 0
        check_export(tmp_path / case, torch.load(out / case / "expected.pt"), "fp32")


@pytest.mark.parametrize("world, ep_size", [(2, 2), (4, 2), (8, 2), (8, 4), (16, 4)])
@pytest.mark.parametrize("d_before_e", [False, True])
def test_expert_data_parallel_ranks_match_deepspeed(world, ep_size, d_before_e):
    from deepspeed.checkpoint.autoep_universal import _autoep_zero12_dp_ranks

    for ep_rank in range(ep_size):
        assert _edp_members(ep_rank, world, ep_size, d_before_e) == list(
            _autoep_zero12_dp_ranks(ep_rank, world, ep_size, d_before_e))


# ------------------------------------------------------------------------ errors name the file / architecture


def copy_step(trained: Path, case: str, tmp_path: Path) -> Path:
    dest = tmp_path / case / TAG
    shutil.copytree(trained / case / TAG, dest)
    return dest


def hf_shapes(case: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = W.tiny_moe(W.CASES[case][0])
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.dist
def test_unverified_architecture_is_refused(trained):
    with pytest.raises(ValueError, match=r"model_type='qwen2_moe' is not supported \(verified: qwen3_moe, mixtral\)"):
        consolidate_autoep_checkpoint(trained / "qwen3_moe_z2" / TAG, "qwen2_moe", hf_shapes("qwen3_moe_z2"))


@pytest.mark.dist
def test_expert_files_that_disagree_with_the_master_weights_are_refused(trained, tmp_path):
    folder = copy_step(trained, "qwen3_moe_z2", tmp_path)
    path = folder / "layer_1_expert_2_mp_rank_00_model_states.pt"
    saved = torch.load(path, weights_only=False)
    saved["lm.model.layers.1.mlp.experts.w3.2"][0, 0] += 1.0
    torch.save(saved, path)
    with pytest.raises(ValueError, match=r"per-expert files of lm\.model\.layers\.1\.mlp\.experts\.w3 differ"):
        consolidate_autoep_checkpoint(folder, "qwen3_moe", hf_shapes("qwen3_moe_z2"))
    path.unlink()
    with pytest.raises(ValueError, match=r"layer_1_expert_2_mp_rank_00_model_states\.pt is missing"):
        consolidate_autoep_checkpoint(folder, "qwen3_moe", hf_shapes("qwen3_moe_z2"))


@pytest.mark.dist
@pytest.mark.parametrize("case, missing", [("qwen3_moe_z2", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                                           ("qwen3_moe_z3", "zero_pp_rank_1_mp_rank_00_model_states.pt")])
def test_a_missing_rank_file_is_named(trained, tmp_path, case, missing):
    folder = copy_step(trained, case, tmp_path)
    (folder / missing).unlink()
    with pytest.raises(ValueError, match=r"files for ranks 0\.\.1 \(dp_world_size=2\), found ranks \[0\]"):
        consolidate_autoep_checkpoint(folder, "qwen3_moe", hf_shapes(case))


@pytest.mark.dist
def test_checkpoint_without_autoep_metadata_is_refused(trained, tmp_path):
    folder = copy_step(trained, "qwen3_moe_z2", tmp_path)
    path = folder / "mp_rank_00_model_states.pt"
    state = torch.load(path, weights_only=False)
    state["ds_autoep_layers"] = None
    torch.save(state, path)
    with pytest.raises(ValueError, match="no ds_autoep_layers metadata: it is not an AutoEP checkpoint"):
        consolidate_autoep_checkpoint(folder, "qwen3_moe", hf_shapes("qwen3_moe_z2"))


@pytest.mark.dist
def test_consolidation_needs_the_model_for_expert_parallel_checkpoints(trained):
    with pytest.raises(ValueError, match=r"pass the transformers model built from its config"):
        consolidated_state_dict(resolve_checkpoint(trained / "qwen3_moe_z3"))
