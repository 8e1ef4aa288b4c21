"""The benchmark scripts run and report consistent results (timings themselves are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts"


def run(script, *args):
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.e2e
def test_bench_train_reports_the_tidar_over_ar_ratio(tmp_path):
    out = tmp_path / "train.json"
    run("bench_train.py", "--model", "tiny_qwen3_moe", "--batch", "2", "--seq-len", "32", "--warmup", "0",
        "--repeats", "1", "--compare-groups", "0", "2", "--out", str(out))
    (row,) = json.loads(out.read_text())["results"]
    assert row["ratio_tidar_over_ar"] == row["median_s"]["tidar"] / row["median_s"]["ar"] > 0
    assert set(row["ratios_over_ar"]) == {"tidar", "tidar_groups0", "tidar_groups2"}
    assert row["ratios_over_ar"]["tidar_groups0"] == row["median_s"]["tidar_groups0"] / row["median_s"]["ar"]


@pytest.mark.e2e
def test_bench_decode_greedy_samplers_agree_with_ar_and_generate(tmp_path):
    out = tmp_path / "decode.json"
    run("bench_decode.py", "--tiny", "--prompts", "2", "--prompt-len", "8", "--max-new-tokens", "6",
        "--repeats", "1", "--block-size", "4", "--out", str(out))
    rows = json.loads(out.read_text())["results"]
    assert {"ar", "lossless", "hf_generate"} <= set(rows)
    assert rows["lossless"]["agreement_with_ar"] == 1.0 and rows["hf_generate"]["agreement_with_ar"] == 1.0
    assert rows["ar"]["speedup_vs_ar"] == 1.0


@pytest.mark.e2e
def test_bench_decode_cache_sweep_times_both_paths_per_prompt_length(tmp_path):
    out = tmp_path / "sweep.json"
    run("bench_decode.py", "--tiny", "tiny_zaya", "--cache-sweep", "8,24", "--prompts", "1", "--max-new-tokens",
        "4", "--levels", "1,2", "--repeats", "1", "--threads", "1", "--out", str(out))
    rows = json.loads(out.read_text())["cache_sweep"]
    assert list(rows) == ["8", "24"]
    for row in rows.values():
        assert row["cache"]["forwards"] == row["recompute"]["forwards"] > 0  # the same decode, two paths
        assert row["recompute_over_cache"] == row["recompute"]["ms_per_forward"] / row["cache"]["ms_per_forward"]


@pytest.mark.e2e
def test_bench_data_reports_throughput_storage_and_startup(tmp_path):
    out = tmp_path / "data.json"
    run("bench_data.py", "--prep-mb", "0.2", "--sizes", "2e5", "--row-len", "1024", "--out", str(out))
    res = json.loads(out.read_text())
    prep = res["prepare"]
    assert prep["tokens"] > 0 and prep["tokens_per_s_1proc"] > 0 and prep["tokens_per_s_2proc"] > 0
    assert 1.9 < prep["bytes_per_token"]["new"] < prep["bytes_per_token"]["old"]  # uint16 ids + offsets
    assert prep["projection_600B"]["hours_one_node"] > 0
    (row,) = res["startup"]
    assert row["tokens"] == 200_000 and row["rows"] > 0 and row["read_row_ms"] > 0


@pytest.mark.e2e
def test_compare_seeds_flags_disjoint_tpf_intervals(tmp_path):
    def eval_json(run, lossless, mixing, outside=None, accept=None):
        phase = tmp_path / run / "1_tidar_midtrain"
        phase.mkdir(parents=True)
        tpf = {name: {"tpf": {"tokens_per_forward": (lo + hi) / 2, "low": lo, "high": hi}}
               for name, (lo, hi) in (("ar", (1.0, 1.0)), ("lossless", lossless), ("mixing_0.5", mixing))}
        if outside:  # TPF outside repeated n-grams, with its interval (eval.json from this round on)
            lo, hi = outside
            tpf["lossless"]["repetition"] = {"tokens_per_forward_outside_repeats": (lo + hi) / 2,
                                             "tokens_per_forward_outside_repeats_low": lo,
                                             "tokens_per_forward_outside_repeats_high": hi}
        diff = {"mixing_0.5": {"difference": 0.1, "low": 0.0, "high": 0.2}}
        stats = {"temperature_0": {"samplers": tpf, "mixing_minus_lossless": diff}}
        result = {"statistics": stats}
        if accept:
            result["agreement_curve"] = {
                "mean_over_drafts": {"argmax_agree": 0.2, "expected_accept": sum(accept) / 2},
                "mean_over_drafts_interval": {"argmax_agree": [0.1, 0.3], "expected_accept": list(accept)}}
        (phase / "eval.json").write_text(json.dumps(result))
        return str(tmp_path / run)

    a = eval_json("a", (1.2, 1.6), (1.4, 1.9))
    b = eval_json("b", (1.5, 1.8), (1.5, 2.0))
    c = eval_json("c", (1.7, 2.0), (1.5, 2.0))  # lossless disjoint from a's
    out = tmp_path / "cmp.json"
    run("compare_seeds.py", a, b, "--out", str(out))
    rows = {r["quantity"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"TPF lossless", "TPF mixing_0.5", "mixing_0.5 - lossless"}  # ar is never compared
    assert all(r["overlap"] for r in rows.values())
    proc = subprocess.run([sys.executable, str(SCRIPTS / "compare_seeds.py"), a, c], capture_output=True, text=True)
    assert proc.returncode == 1 and "| TPF lossless | 1.40 [1.20, 1.60] | 1.85 [1.70, 2.00] | NO |" in proc.stdout
    # the drafter figures that do not depend on loops: TPF outside repeats and the teacher-forced agreement
    d = eval_json("d", (1.2, 1.6), (1.4, 1.9), outside=(1.00, 1.02), accept=(0.50, 0.54))
    e = eval_json("e", (1.3, 1.7), (1.4, 1.9), outside=(1.03, 1.05), accept=(0.52, 0.56))
    loops = subprocess.run([sys.executable, str(SCRIPTS / "compare_seeds.py"), d, e, "--out", str(out)],
                           capture_output=True, text=True)
    rows = {r["quantity"]: r for r in json.loads(out.read_text())}
    assert rows["agreement expected_accept"]["overlap"] and rows["agreement argmax_agree"]["overlap"]
    assert rows["agreement expected_accept"]["temperature"] == "teacher-forced"
    assert not rows["TPF outside repeats lossless"]["overlap"]  # a disjoint TPF of any kind fails the comparison
    assert loops.returncode == 1 and "| TPF outside repeats lossless | 1.01 [1.00, 1.02] | 1.04 [1.03, 1.05] | NO |" \
        in loops.stdout


@pytest.mark.e2e
def test_compare_seeds_says_whether_the_runs_converted_the_same_base(tmp_path):
    def base(name, payload):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(payload)
        return folder

    def pipeline(run, base_dir):
        phase = tmp_path / run / "1_tidar_midtrain"
        phase.mkdir(parents=True)
        tpf = {"lossless": {"tpf": {"tokens_per_forward": 1.5, "low": 1.2, "high": 1.8}}}
        result = {"statistics": {"temperature_1": {"samplers": tpf}}}
        if base_dir is not None:
            result["quality_base"] = str(base_dir)
        (phase / "eval.json").write_text(json.dumps(result))
        return str(tmp_path / run)

    b0, copy, b1 = base("b0", b"weights-0"), base("copy", b"weights-0"), base("b1", b"weights-1")
    a, b, c, d, e = (pipeline("a", b0), pipeline("b", b0), pipeline("c", copy), pipeline("d", b1),
                     pipeline("e", None))
    assert "bases: one base checkpoint" in run("compare_seeds.py", a, b)
    assert "bases: identical weights" in run("compare_seeds.py", a, c)
    assert "bases: different base checkpoints" in run("compare_seeds.py", a, b, d)
    assert "bases: not recorded" in run("compare_seeds.py", a, e)


@pytest.mark.e2e
def test_alignment_table_reports_intervals_for_the_drafter_figures(tmp_path):
    def tpf(value, low, high):
        return {"tokens_per_forward": value, "low": low, "high": high}

    def eval_json(label, accept_interval=None):
        rep = {"accepted_in_repeats": 0.9, "tokens_per_forward_outside_repeats": 1.02}
        if accept_interval:  # eval.json from this round on: intervals for the loop-free figures
            rep.update(tokens_per_forward_outside_repeats_low=1.0, tokens_per_forward_outside_repeats_high=1.05)
        temp = {"samplers": {"lossless": {"tpf": tpf(1.5, 1.2, 1.9), "repetition": rep},
                             "mixing_0.5": {"tpf": tpf(1.7, 1.4, 2.1), "repetition": rep}},
                "mixing_minus_lossless": {"mixing_0.5": {"difference": 0.2, "low": 0.05, "high": 0.4}},
                "notes": []}
        curve = {"argmax_agree": [0.6, 0.2], "expected_accept": [0.8, 0.5],
                 "mean_over_drafts": {"argmax_agree": 0.2, "expected_accept": 0.5}}
        if accept_interval:
            curve["mean_over_drafts_interval"] = {"argmax_agree": [0.15, 0.25], "expected_accept": accept_interval}
        result = {"statistics": {"temperature_0": temp, "temperature_1": temp}, "agreement_curve": curve,
                  "samplers": {"ar": {}, "lossless": {}, "mixing_0.5": {}},
                  "heldout": {"loss_ar": 5.7, "loss_diff": 6.5},
                  "quality": {"nll_excess_over_ar": {"lossless": 0.01, "mixing_0.5": 0.8}}}
        folder = tmp_path / label.replace("/", "_")
        folder.mkdir()
        (folder / "eval.json").write_text(json.dumps(result))
        return f"{label}={folder}"

    out = tmp_path / "table.json"
    stdout = run("alignment_table.py", eval_json("data/s0", [0.48, 0.52]), eval_json("old"), "--out", str(out))
    new, old = json.loads(out.read_text())
    assert new["expected_accept_mean_drafts"] == "0.500 [0.480, 0.520]"
    assert new["tpf_outside_repeats_lossless_greedy"] == "1.020 [1.000, 1.050]"
    assert old["expected_accept_mean_drafts"] == "0.500" and old["tpf_outside_repeats_lossless_greedy"] == "1.020"
    assert new["mixing_0.5_minus_lossless_greedy"] == "+0.20 [+0.05, +0.40]"
    assert "| data/s0 |" in stdout and "| old |" in stdout


def byte_tokenizer():
    """A byte-level tokenizer with no merges: one token per byte (256 ids), enough to route real text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_router_load_middle_windows_are_held_out_disjoint_and_past_the_head():
    sys.path.insert(0, str(SCRIPTS))
    from router_load import middle_windows

    from ar2diff.data.sources import in_heldout, read_stdlib_file, stdlib_files

    tokenizer = byte_tokenizer()
    windows = middle_windows(tokenizer, 40, 64, 0.005, seed=0)
    assert windows == middle_windows(tokenizer, 40, 64, 0.005, seed=0) != middle_windows(tokenizer, 40, 64, 0.005, 1)
    texts = [read_stdlib_file(rel)[0] for rel in stdlib_files() if in_heldout(rel, 0.005)]
    files = [tokenizer.encode(text, add_special_tokens=False) for text in texts if text]
    # each window is a 64-token slice at a multiple of 64, past the first 64 tokens, of some held-out file
    starts = {tuple(ids[s:s + 64]) for ids in files for s in range(64, len(ids) - 63, 64)}
    assert all(len(w) == 64 and tuple(w) in starts for w in windows)
    assert len({tuple(w) for w in windows}) == len(windows)
    with pytest.raises(SystemExit, match="give .* windows of 64 tokens past their heads"):
        middle_windows(tokenizer, 10 ** 6, 64, 0.005, seed=0)


@pytest.mark.e2e
def test_router_load_cli_reports_loads_and_a_paired_loss(tmp_path):
    from tiny import TINY_CONFIGS

    from ar2diff.model import build_model

    tokenizer = byte_tokenizer()
    for name, seed in (("a", 0), ("b", 1)):
        lm = build_model(dict(TINY_CONFIGS["zaya"], vocab_size=len(tokenizer)), seed=seed)
        lm.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    out = tmp_path / "load.json"
    args = ["--windows", "middle", "--tokens", "32", "--rows", "6", "--loss-windows", "5", "--heldout-fraction",
            "0.005", "--out", str(out)]
    stdout = run("router_load.py", str(tmp_path / "a"), *args, "--against", str(tmp_path / "b"))
    res = json.loads(out.read_text())
    assert set(res["layers"]) == {f"layer{i}" for i in range(TINY_CONFIGS["zaya"]["num_hidden_layers"])}
    assert all(m["min_load"] <= 1 <= m["max_load"] for m in res["layers"].values())
    assert res["worst"]["max_load"] == max(m["max_load"] for m in res["layers"].values())
    loss = res["heldout_loss"]
    assert loss["windows"] == 5 and loss["mean"] > 0
    against = loss["against"]  # another seed's model on the same windows
    assert against["paired_difference"] == pytest.approx(loss["mean"] - against["mean"])
    assert against["paired_difference"] != 0.0 and against["stderr"] > 0
    assert "worst layer: max" in stdout and "paired, this minus that" in stdout
    bad = subprocess.run([sys.executable, str(SCRIPTS / "router_load.py"), str(tmp_path / "a"), "--against",
                          str(tmp_path / "b")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--against compares held-out losses: give --loss-windows N too" in bad.stderr


@pytest.mark.e2e
def test_bench_sdpa_mask_runs_every_form_in_fresh_processes(tmp_path):
    out = tmp_path / "mask.json"
    stdout = run("bench_sdpa_mask.py", "--seq-len", "64", "--repeats", "1", "--out", str(out))
    res = json.loads(out.read_text())
    boolean, additive, split = res["forms"]["boolean"], res["forms"]["additive"], res["forms"]["split"]
    assert [boolean["form"], additive["form"], split["form"]] == ["boolean", "additive", "split"]
    assert res["layers"] >= 1
    assert res["time_ratio_additive_over_boolean"] == additive["median_s"] / boolean["median_s"]
    assert res["time_ratio_split_over_additive"] == split["median_s"] / additive["median_s"]
    assert len(boolean["seconds"]) == len(additive["seconds"]) == len(split["seconds"]) == 1
    assert "additive / boolean: peak" in stdout and "split / additive: peak" in stdout


def test_check_lossless_t1_passes_lossless_and_rejects_the_accept_every_draft_control():
    """scripts/check_lossless_t1.py's test on a 6-token vocabulary (as tests/test_decode_tidar.py's, but through the
    script's own binning, sampler runs and control): lossless passes, keeping every draft is rejected."""
    import torch
    from tiny import TINY_CONFIGS, randomize

    from ar2diff.decode.tidar import TidarConfig
    from ar2diff.model import TidarLM, build_model

    sys.path.insert(0, str(SCRIPTS))
    from check_lossless_t1 import check_prompt as chi_square_check

    torch.set_num_threads(1)
    vocab = 6
    lm = randomize(build_model(dict(TINY_CONFIGS["llama"], vocab_size=vocab), seed=11), seed=11, scale=0.5).eval()
    model = TidarLM(lm, mask_token_id=vocab - 1, block_size=4)
    cfg = TidarConfig(max_new_tokens=3, temperature=1.0, seed=0, levels=(1, 2))
    lossless = chi_square_check(model, [1, 3, 4], cfg, 1500, 5.0, control=False)
    control = chi_square_check(model, [1, 3, 4], cfg, 1500, 5.0, control=True)
    assert 0.1 < lossless["draft_kept"] < 0.9 and control["draft_kept"] == 1.0
    assert lossless["bins"] == control["bins"] >= 10 and lossless["df"] == lossless["bins"] - 1
    assert lossless["p_value"] > 0.001 and control["p_value"] < 1e-6, (lossless, control)
