"""lm-eval-harness through ar2diff: a local multiple-choice task (loglikelihood from the AR stream) and a local
generation task (TiDAR lossless / AR sampler) run end to end on a tiny export, agreeing with scores computed by hand
from the transformers model; tokens per forward is reported beside each task's metric."""

import json
import types

import pytest
import torch

pytest.importorskip("lm_eval")

from ar2diff.checkpoint.export_layout import export_model# noqa: E402
from ar2diff.evaluate import main  # noqa: E402
from ar2diff.evaluation.lm_eval_model import Ar2diffLM, run_tasks  # noqa: E402
from tiny import MASK_ID, mask_word_tokenizer, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CHOICE_TASK = """task: toy_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""
GEN_TASK = """task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["w95"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""
CONTEXTS = ["w3 w4 w5 w6", "w10 w20 w30", "w7 w7 w8 w9 w10"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny llama export, and task folders whose expected scores are computed with the transformers model."""
    root = tmp_path_factory.mktemp("lm_eval")
    tok, lm = mask_word_tokenizer(), tiny_model("llama", seed=2)
    export = root / "export"
    export_model(lm, tok, export, {"mask_token_id": MASK_ID, "block_size": 4, "phase": "tidar_midtrain"})
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in CONTEXTS]
    choices = [["w11", "w12", "w13"], ["w40", "w41", "w42"], ["w50", "w51", "w52"]]
    with torch.no_grad():
        logp = [torch.log_softmax(lm(torch.tensor([i])).logits[0, -1], -1) for i in ids]
        best = [int(torch.stack([lp[tok.convert_tokens_to_ids(c)] for c in cs]).argmax())
                for lp, cs in zip(logp, choices)]
        greedy = [lm.generate(torch.tensor([i]), max_new_tokens=6, do_sample=False)[0, len(i):].tolist() for i in ids]
    labels = [best[0], best[1], (best[2] + 1) % 3]  # the model is right on 2 of 3 by construction
    texts = [tok.decode([t for t in g if t != tok.eos_token_id], skip_special_tokens=True) for g in greedy]
    texts = [t.split("w95")[0] for t in texts]
    targets = [texts[0], texts[1], texts[2] + " w94"]  # exact match on 2 of 3
    (root / "choice.jsonl").write_text("".join(json.dumps({"context": c, "choices": cs, "label": lab}) + "\n"
                                               for c, cs, lab in zip(CONTEXTS, choices, labels)))
    (root / "gen.jsonl").write_text("".join(json.dumps({"context": c, "target": t}) + "\n"
                                            for c, t in zip(CONTEXTS, targets)))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "toy_choice.yaml").write_text(CHOICE_TASK.format(data=root / "choice.jsonl"))
    (tasks / "toy_gen.yaml").write_text(GEN_TASK.format(data=root / "gen.jsonl"))
    return {"export": export, "tasks": tasks, "lm": lm, "tok": tok, "root": root}


@pytest.mark.parametrize("sampler", ["lossless", "ar"])
def test_local_tasks_end_to_end_match_hand_computed_scores(setup, sampler, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm = Ar2diffLM.from_export(setup["export"], sampler=sampler)
    report = run_tasks(lm, ["toy_choice", "toy_gen"], include_path=str(setup["tasks"]), include_defaults=False)
    choice, gen = report["tasks"]["toy_choice"], report["tasks"]["toy_gen"]
    assert choice["metrics"]["acc,none"] == pytest.approx(2 / 3)
    assert choice["tokens_per_forward"] is None  # loglikelihood only: no generation
    assert gen["metrics"]["exact_match,none"] == pytest.approx(2 / 3)
    assert gen["generations"] == 3
    if sampler == "ar":
        assert gen["tokens_per_forward"] == 1.0
    else:
        assert gen["tokens_per_forward"] >= 1.0


def test_rolling_loglikelihood_is_the_sum_over_the_text_after_the_prefix_token(setup):
    lm = Ar2diffLM.from_export(setup["export"], sampler="ar", max_length=4)  # forces several windows
    text = "w3 w9 w27 w81 w5 w15 w45"
    ids = [setup["tok"].bos_token_id] + setup["tok"](text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # one full-context forward: the windows see less context, so compare per window
        full = torch.log_softmax(setup["lm"](torch.tensor([ids])).logits[0, :-1], -1)
    by_hand = float(full.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    rolled = lm.loglikelihood_rolling([types.SimpleNamespace(args=(text,))])[0]
    lm.max_length = 64
    assert lm.loglikelihood_rolling([types.SimpleNamespace(args=(text,))])[0] == pytest.approx(by_hand, abs=1e-4)
    assert rolled != pytest.approx(by_hand, abs=1e-4)  # truncated context changes the score: windows were used


def test_cli_writes_the_report_and_names_bad_arguments(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "r.json"
    assert main(["--checkpoint", str(setup["export"]), "--tasks", "toy_gen", "--include-path", str(setup["tasks"]),
                 "--only-include-path", "--sampler", "mixing", "--mix-weight", "0.5", "--output", str(out), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["sampler"] == "mixing" and report["mix_weight"] == 0.5
    assert report["tasks"]["toy_gen"]["tokens_per_forward"] >= 1.0
    assert "tokens/forward" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--mix-weight 0.0 must lie in"):
        Ar2diffLM.from_export(setup["export"], sampler="mixing")
