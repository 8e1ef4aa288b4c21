"""Top-level conf/ and recipes/: recipes compose from any working directory and from an installed (non-editable)
wheel; a user's own recipe folder joins through Hydra's search path and trains; the command line explains itself
(--help lists the recipes, a bare run says what to run, the start-up names the run folder and the resume command)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ar2diff.run_folder import resume_command, sweep_job_dirname
from tiny import GOLDEN_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
COMPOSE = textwrap.dedent("""
    import json, sys
    from ar2diff.config import paths
    from ar2diff.config.compose import compose
    cfg = compose(sys.argv[1:])
    print(json.dumps({"conf": str(paths.CONF_DIR), "name": cfg.name, "seq_len": cfg.data.seq_len,
                      "chunk": cfg.objective.loss_chunk_tokens, "alpha": cfg.objective.alpha}))
""")
MIDTRAIN = ["recipe=tidar_midtrain", "model.path=/ckpt/base", "data.sources.0.path=/data/*.jsonl"]


def env(pythonpath: str) -> dict:
    e = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=pythonpath, PYTHONHASHSEED="0")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def compose_in(cwd: Path, pythonpath: str, *overrides: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", COMPOSE, *overrides], cwd=cwd, env=env(pythonpath),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
def test_recipe_composes_from_an_unrelated_working_directory(tmp_path):
    out = compose_in(tmp_path, str(REPO), *MIDTRAIN)
    assert out["conf"] == str(REPO / "conf")
    assert (out["name"], out["seq_len"], out["chunk"]) == ("tidar_midtrain", 32768, 4096)


@pytest.mark.e2e
def test_recipe_composes_from_an_installed_wheel(tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (target / "ar2diff" / "conf" / "config.yaml").is_file()
    assert (target / "ar2diff" / "recipes" / "tidar_midtrain.yaml").is_file()
    out = compose_in(tmp_path, str(target), *MIDTRAIN)  # the wheel only: no checkout on the path
    assert out["conf"] == str(target / "ar2diff" / "conf")
    assert (out["name"], out["seq_len"], out["chunk"]) == ("tidar_midtrain", 32768, 4096)


def user_recipe_folder(root: Path) -> Path:
    (root / "recipe").mkdir(parents=True)
    (root / "recipe" / "my_tiny.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        name: my_tiny
        objective: {alpha: 0.5}
        budget: {tokens: 512}
    """))
    return root


@pytest.mark.e2e
def test_user_recipe_folder_joins_the_search_path(tmp_path):
    folder = user_recipe_folder(tmp_path / "mine")
    out = compose_in(tmp_path, str(REPO), f"hydra.searchpath=[file://{folder}]", "recipe=my_tiny")
    assert (out["name"], out["alpha"]) == ("my_tiny", 0.5)
    out = compose_in(tmp_path, str(REPO), f"hydra.searchpath=[file://{folder}]", *MIDTRAIN)  # built-ins still there
    assert out["name"] == "tidar_midtrain"


@pytest.mark.e2e
def test_user_recipe_trains_and_its_run_folder_explains_itself(tmp_path):
    folder, run_dir = user_recipe_folder(tmp_path / "mine"), tmp_path / "run"
    args = [f"hydra.searchpath=[file://{folder}]", "recipe=my_tiny",
            *[o for o in GOLDEN_OVERRIDES if not o.startswith("budget.tokens")], f"data.cache_dir={tmp_path / 'cache'}",
            f"run_dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "ar2diff.train", *args], cwd=tmp_path, env=env(str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"run folder: {run_dir}" in proc.stdout
    assert resume_command([a for a in args if not a.startswith("run_dir=")], run_dir) in proc.stdout
    resolved = OmegaConf.load(run_dir / "config.yaml")
    assert (resolved.name, resolved.objective.alpha, resolved.budget.tokens) == ("my_tiny", 0.5, 512)
    assert "recipe=my_tiny" in list(OmegaConf.load(run_dir / "overrides.yaml"))
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


@pytest.mark.e2e
def test_help_lists_recipes_and_a_bare_run_explains_what_to_run(tmp_path):
    help_ = subprocess.run([sys.executable, "-m", "ar2diff.train", "--help"], cwd=tmp_path, env=env(str(REPO)),
                           capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0
    assert "recipe: ar_pretrain, context_extension, diffusion_sft, quickstart, reference_smollm2, tidar_midtrain" in help_.stdout
    assert "run_dir=DIR" in help_.stdout and "accelerator" not in help_.stdout + help_.stderr
    bare = subprocess.run([sys.executable, "-m", "ar2diff.train"], cwd=tmp_path, env=env(str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0 and "needs a recipe" in bare.stderr and "recipe=quickstart" in bare.stderr
    assert not (tmp_path / "outputs").exists()


def test_resume_command_and_sweep_job_names():
    cmd = resume_command(["recipe=quickstart", "run_dir=/old", "data.sources.0.path=/d/*.jsonl"], "/runs/a")
    assert cmd == "python -m ar2diff.train recipe=quickstart 'data.sources.0.path=/d/*.jsonl' run_dir=/runs/a"
    argv = ["--multirun", "schedule.lr=1e-3", "objective.alpha=0.5,2.0", "seed=range(0,2)"]
    assert sweep_job_dirname(["schedule.lr=0.001", "objective.alpha=2.0", "seed=1"], argv) == \
        "objective.alpha=2.0,seed=1"
    assert sweep_job_dirname(["a=b/c"], ["a=b/c,d"]) == "a=b_c"


@pytest.mark.e2e
def test_hydra_flags_keep_their_values_when_overrides_move_behind_them(tmp_path):
    from ar2diff.train import split_flags

    assert split_flags(["recipe=quickstart", "--cfg", "job", "seed=3", "-cn", "config", "--info", "x=1"]) == (
        ["--cfg", "job", "-cn", "config", "--info"], ["recipe=quickstart", "seed=3", "x=1"])
    proc = subprocess.run([sys.executable, "-m", "ar2diff.train", "recipe=quickstart", "--cfg", "job", "seed=3"],
                          cwd=tmp_path, env=env(str(REPO)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = OmegaConf.create(proc.stdout)
    assert job.name == "quickstart" and job.seed == 3
