"""notebooks/compare_runs.ipynb runs top to bottom on run folders written the way the trainer writes them (RunLogger
summary.json, eval.json from evaluate_checkpoint/write_eval, pipeline.json) and prints the expected tables."""

import json
import os
from pathlib import Path

import pytest
import torch

from ar2diff.analysis import RUN_DIRS_ENV, load_runs, phase_dirs
from ar2diff.config.schema import DecoderEvalConfig
from ar2diff.evaluation.decoder_check import evaluate_checkpoint
from ar2diff.evaluation.eval_json import write_eval
from ar2diff.fs import write_json_atomic
from ar2diff.logging import RunLogger
from ar2diff.model import TidarLM
from ar2diff.objective import TidarObjective
from tiny import MASK_ID, tiny_model

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_runs.ipynb"
S = 16


def rows(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, MASK_ID, (4, S), generator=torch.Generator().manual_seed(seed))
    doc = torch.zeros(4, S, dtype=torch.int32)
    return {"input_ids": ids, "doc_ids": doc, "position_ids": torch.arange(S).expand(4, S).clone(),
            "loss_mask": torch.ones(4, S, dtype=torch.bool)}


def write_phase(run_dir: Path, phase: str, seed: int, losses: list[float], eval_in_run_dir: bool = True) -> dict:
    """A phase folder as PhaseTrainer + its decoder check leave it: summary.json and eval.json (run_dir and export/)."""
    logger = RunLogger(run_dir, rank=0, name=f"test:{phase}", group=None, config={})
    for step, loss in enumerate(losses, start=1):
        logger.log(step, {"loss": loss, "loss_ar": loss * 0.9, "loss_diff": loss * 1.1, "lr": 1e-3})
    model = TidarObjective(TidarLM(tiny_model("llama", seed=seed), MASK_ID, block_size=4))
    dcfg = DecoderEvalConfig(num_prompts=2, prompt_len=4, max_new_tokens=6, mix_weights=[1.0])
    result = evaluate_checkpoint(model, rows(seed), dcfg, eos_id=None, heldout_batches=1, micro_batch=2)
    folders = [run_dir / "export", run_dir] if eval_in_run_dir else [run_dir / "export"]
    write_eval(result, folders, logger, step=len(losses))
    logger.update_summary({"phase": phase, "recipe": "test", "steps": len(losses)})
    logger.write_summary(run_dir / "summary.json")
    return result


@pytest.fixture(scope="module")
def run_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    pipe = root / "pipe"
    expected = {
        "pipe/0_tidar_midtrain": write_phase(pipe / "0_tidar_midtrain", "tidar_midtrain", 1, [5.0, 4.0, 3.5]),
        "pipe/1_context_extension": write_phase(pipe / "1_context_extension", "context_extension", 2, [3.4, 3.3],
                                                eval_in_run_dir=False),
    }
    write_json_atomic(pipe / "pipeline.json", {"recipe": "test_pipeline", "group": "g", "phases": [
        {"phase": p, "run_dir": f"outputs/test_pipeline/ts/{name}", "export_dir": "unused"}
        for p, name in (("tidar_midtrain", "0_tidar_midtrain"), ("context_extension", "1_context_extension"))]})
    single = root / "2024-01-01_00-00-00"
    expected[f"{root.name}/{single.name}"] = write_phase(single, "diffusion_sft", 3, [2.0])
    return [pipe, single], expected


def test_load_runs_reads_pipelines_and_phase_folders(run_folders):
    dirs, expected = run_folders
    assert phase_dirs(dirs[0]) == [dirs[0] / "0_tidar_midtrain", dirs[0] / "1_context_extension"]
    runs = load_runs(dirs)
    assert [r.label for r in runs] == list(expected)
    assert [r.phase for r in runs] == ["tidar_midtrain", "context_extension", "diffusion_sft"]
    assert runs[0].curve("train/loss") == ([1, 2, 3], [5.0, 4.0, 3.5])
    assert all(r.eval == json.loads(json.dumps(e)) for r, e in zip(runs, expected.values()))
    (dirs[0].parent / "empty").mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_runs([dirs[0].parent / "empty"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_runs([dirs[0] / "missing"])


def cell_text(nb, tag: str) -> str:
    cell = next(c for c in nb.cells if tag in c.metadata.get("tags", []))
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def has_image(nb, tag: str) -> bool:
    cell = next(c for c in nb.cells if tag in c.metadata.get("tags", []))
    return any("image/png" in o.get("data", {}) for o in cell.outputs)


@pytest.mark.e2e
def test_notebook_runs_and_shows_the_runs(run_folders, monkeypatch):
    dirs, expected = run_folders
    monkeypatch.setenv(RUN_DIRS_ENV, os.pathsep.join(map(str, dirs)))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    table = cell_text(nb, "sampler-table").splitlines()
    assert table[0].split() == ["run", "phase", "sampler", "tokens_per_forward", "speedup_wall", "agreement_tokens",
                                "nll_excess_over_ar", "projected_speedup_MI300X"]
    assert len(table) == 1 + 3 * len(expected)  # ar, lossless, mixing_1 per phase run
    for label, result in expected.items():
        for name, s in result["samplers"].items():
            line = next(line.split() for line in table if line.split()[:1] == [label] and line.split()[2] == name)
            assert line[3] == f"{s['tokens_per_forward']:.3f}"
            assert line[5] == f"{s['agreement_tokens']:.3f}"
            excess = result["quality"]["nll_excess_over_ar"].get(name)
            assert line[6] == ("-" if excess is None else f"{excess:.3f}")
    losses = cell_text(nb, "loss-table").splitlines()
    assert [line.split()[:4] for line in losses[1:]] == [
        ["pipe/0_tidar_midtrain", "tidar_midtrain", "3", "3.500"],
        ["pipe/1_context_extension", "context_extension", "2", "3.300"],
        [list(expected)[2], "diffusion_sft", "1", "2.000"]]
    assert all(has_image(nb, tag) for tag in ("loss-curves", "tpf-chart", "acceptance"))
