"""scripts/launch_rocm_cluster.sh with stub pdsh/ssh (two nodes) and a stub training module (one node): every
setting reaches the ranks, the command runs ar2diff.train with the user's overrides and --no_local_rank; the
layout helper refuses hostfiles the recipe does not fit."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ar2diff.config.compose import compose
from ar2diff.launch import LayoutError, parse_hostfile, world_layout

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "launch_rocm_cluster.sh"
RECORDER = """#!{python}
import json, os, sys
with open(os.path.join(os.environ["STUB_LOG"], "{name}.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""
STUB_TRAIN = """import json, os, sys
with open(os.path.join(os.environ["STUB_LOG"], "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, f)
"""
USER = ["recipe=tidar_midtrain", "data.sources.0.path=/data/shard-*.jsonl", "objective.block_size=32",
        "budget.global_batch_size=8"]


def script_exports(text: str) -> set[str]:
    """The variables the launch script sets for the ranks (its `export NAME=` lines; DS_ENV_FILE is the launcher's)."""
    return set(re.findall(r"^export (\w+)=", text, re.M)) - {"DS_ENV_FILE"}


def pdsh_exports(args: list[str]) -> dict[str, str]:
    """The `export K=V;` prefix of the remote command pdsh was given."""
    prefix = next(a for a in args if a.startswith("export "))
    return dict(part.strip().split(" ", 1)[1].split("=", 1) for part in prefix.split(";") if part.strip())


def run_script(tmp_path, hosts: list[str], script: Path = SCRIPT, extra_env=None, stub_train=False, user=USER):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(exist_ok=True)
    log.mkdir(exist_ok=True)
    for name in ("pdsh", "ssh"):
        (bin_dir / name).write_text(RECORDER.format(python=sys.executable, name=name))
        (bin_dir / name).chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h}\n" for h in hosts))
    pythonpath = [str(REPO)]
    if stub_train:  # an `ar2diff` package whose `train` module records what a rank sees; the rest is the real one
        pkg = tmp_path / "stub" / "ar2diff"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(f"__path__.append({str(REPO / 'ar2diff')!r})\n")
        (pkg / "train.py").write_text(STUB_TRAIN)
        pythonpath.insert(0, str(tmp_path / "stub"))
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    # the script forwards these prefixes from the caller's environment too: start from none of them (CI sets HF_*)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NCCL_", "RCCL_", "HSA_", "HIP_", "WANDB_", "HF_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHONPATH=":".join(pythonpath), STUB_LOG=str(log),
               PYTHON=sys.executable, MASTER_PORT="29731", **(extra_env or {}))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "DS_ENV_FILE"):
        env.pop(key, None)
    proc = subprocess.run(["bash", str(script), str(hostfile), *user, f"model.path={model}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=180)
    return proc, log


@pytest.mark.e2e
def test_two_nodes_forward_every_setting_and_run_train_with_the_overrides(tmp_path):
    proc, log = run_script(tmp_path, ["localhost slots=1", "127.0.0.1 slots=1"],
                           extra_env={"SITE_SCRATCH": "/scratch/x", "FORWARD_ENV": "SITE_SCRATCH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (args,) = [json.loads(line) for line in (log / "pdsh.jsonl").read_text().splitlines()]
    exported = pdsh_exports(args)
    expected = script_exports(SCRIPT.read_text()) | {"SITE_SCRATCH"}
    assert expected <= exported.keys(), expected - exported.keys()
    assert exported["PYTORCH_HIP_ALLOC_CONF"] == "expandable_segments:True"
    assert exported["HSA_FORCE_FINE_GRAIN_PCIE"] == "1" and exported["SITE_SCRATCH"] == "/scratch/x"
    assert "-w" in args and args[args.index("-w") + 1] == "localhost,127.0.0.1"
    assert "--no_local_rank" in args and "--module" in args
    user_args = args[args.index("ar2diff.train") + 1:]
    assert user_args[:len(USER)] == USER
    run_dir = next(a.split("=", 1)[1] for a in user_args if a.startswith("run_dir="))
    assert run_dir.startswith("outputs/tidar_midtrain/")  # fixed before launch, shared by every rank
    env_file = tmp_path / run_dir / "launch" / "ds_env"
    lines = env_file.read_text().splitlines()
    assert all(re.fullmatch(r"[A-Za-z_]\w*=.*", line) for line in lines)  # DeepSpeed rejects any other line
    assert {line.split("=", 1)[0] for line in lines} == expected


@pytest.mark.e2e
def test_a_variable_the_script_stops_forwarding_is_caught(tmp_path):
    text = SCRIPT.read_text()
    dropped = text.replace("RCCL_MSCCL_ENABLE TORCH_NCCL_ASYNC_ERROR_HANDLING", "RCCL_MSCCL_ENABLE")
    assert dropped != text
    script = tmp_path / "launch_dropped.sh"
    script.write_text(dropped)
    proc, log = run_script(tmp_path, ["localhost slots=1", "127.0.0.1 slots=1"], script=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (args,) = [json.loads(line) for line in (log / "pdsh.jsonl").read_text().splitlines()]
    assert script_exports(dropped) - pdsh_exports(args).keys() == {"TORCH_NCCL_ASYNC_ERROR_HANDLING"}


@pytest.mark.dist
def test_single_node_ranks_see_every_setting_and_the_overrides(tmp_path):
    proc, log = run_script(tmp_path, ["localhost slots=2"], stub_train=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (log / "pdsh.jsonl").exists()  # one node: DeepSpeed launches locally
    ranks = [json.loads((log / f"rank{r}.json").read_text()) for r in range(2)]
    for seen in ranks:
        assert script_exports(SCRIPT.read_text()) <= seen["env"].keys()
        assert seen["argv"][:len(USER)] == USER and not any(a.startswith("--local_rank") for a in seen["argv"])
        assert seen["env"]["WORLD_SIZE"] == "2"
    assert ranks[0]["argv"] == ranks[1]["argv"]  # the same run_dir on every rank


@pytest.mark.e2e
def test_dry_run_prints_the_layout_and_refuses_a_hostfile_that_does_not_fit(tmp_path):
    hosts = [f"node-{i:02d} slots=8" for i in range(8)]
    user = ["recipe=tidar_midtrain"]  # the recipe's own global batch of 256 rows, no data path: a dry run reads none
    proc, log = run_script(tmp_path, hosts, extra_env={"DRY_RUN": "1"}, user=user)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nodes: 8, ranks per node: 8, world size: 64" in proc.stderr
    assert "data parallel: 64, sequence parallel: 1, expert parallel: 1" in proc.stderr
    assert "node 7 (node-07, 8 ranks)" in proc.stdout and "--no_local_rank --module ar2diff.train" in proc.stdout
    assert not (log / "pdsh.jsonl").exists() and not (tmp_path / "outputs").exists()  # nothing started or written
    proc, _ = run_script(tmp_path, hosts[:3], extra_env={"DRY_RUN": "1"}, user=user)  # 24 ranks do not divide 256
    assert proc.returncode != 0 and "refused" in proc.stderr and "budget.global_batch_size" in proc.stderr


def test_layout_checks_sequence_parallel_groups_inside_a_node(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=6\n# comment\nb slots=6\n")
    hosts = parse_hostfile(hostfile)
    cfg = compose(["recipe=tidar_midtrain", "model.path=/x", "data.sources.0.path=/d",
                   "deepspeed.sequence_parallel_size=4", "budget.global_batch_size=3"])
    with pytest.raises(LayoutError, match="sequence_parallel_size=4"):
        world_layout(cfg, hosts)
    hostfile.write_text("a slots=8\nb slots=8\n")
    cfg = compose(["recipe=tidar_midtrain", "model.path=/x", "data.sources.0.path=/d",
                   "deepspeed.sequence_parallel_size=4", "budget.global_batch_size=4"])
    layout = world_layout(cfg, parse_hostfile(hostfile))
    assert (layout.world_size, layout.data_parallel, layout.sequence_parallel) == (16, 4, 4)
    hostfile.write_text("a slots=eight\n")
    with pytest.raises(LayoutError, match="HOST slots=N"):
        parse_hostfile(hostfile)
