"""`python -m ar2diff.decode` on an exported-like folder: JSON output equals the library call, bad input is named."""

import json
import subprocess
import sys

import pytest

from ar2diff.decode.ar import DecodeConfig, decode_ar
from ar2diff.decode.cli import main
from ar2diff.decode.tidar import TidarConfig, decode_tidar
from ar2diff.model import TidarLM, build_model, load_model
from tiny import TINY_CONFIGS, randomize

WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "[MASK]"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]", mask_token="[MASK]")


def export_like(folder, with_mask: bool = True, with_block: bool = True):
    """What ar2diff.export writes: config.json (+ mask_token_id, tidar_block_size), safetensors, tokenizer."""
    tokenizer = make_tokenizer()
    config = dict(TINY_CONFIGS["llama"], vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    lm = randomize(build_model(config, seed=3), seed=3)
    if with_mask:
        lm.config.mask_token_id = tokenizer.mask_token_id
    if with_block:
        lm.config.tidar_block_size = 4
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return export_like(tmp_path_factory.mktemp("export"))


PROMPTS = ["w1 w2 w3", "w7"]


def library(folder, sampler, **cfg):
    lm = load_model(folder)
    tokenizer = make_tokenizer()
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    if sampler == "ar":
        return decode_ar(lm, prompts, DecodeConfig(**cfg), tokenizer=tokenizer)
    return decode_tidar(TidarLM(lm, tokenizer.mask_token_id, 4), prompts, TidarConfig(**cfg, sampler=sampler),
                        tokenizer=tokenizer)


def same(report_results, results):
    assert len(report_results) == len(results)
    for got, want in zip(report_results, results):
        assert got["token_ids"] == want.token_ids and got["text"] == want.text
        assert got["forwards"] == want.forwards and got["accepted"] == want.accepted and got["stop"] == want.stop
        assert got["drafts"] == want.drafts and got["templates"] == want.templates


@pytest.mark.e2e
def test_json_output_matches_the_library(checkpoint):
    cmd = [sys.executable, "-m", "ar2diff.decode", "--checkpoint", str(checkpoint), "--prompt", PROMPTS[0],
           "--prompt", PROMPTS[1], "--sampler", "lossless", "--temperature", "1", "--seed", "3", "--levels", "0,2",
           "--max-new-tokens", "10", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["sampler"] == "lossless" and report["settings"]["levels"] == [0, 2]
    assert [r["prompt"] for r in report["results"]] == PROMPTS
    want = library(checkpoint, "lossless", max_new_tokens=10, temperature=1.0, seed=3, levels=(0, 2), eos_token_id=2,
                   block_size=4)
    same(report["results"], want)
    assert report["summary"]["forwards"] == sum(r.forwards for r in want)
    assert all(isinstance(r["text"], str) and r["text"] for r in report["results"])


@pytest.mark.parametrize("sampler, extra, cfg", [
    ("ar", [], {}),
    ("mixing", ["--mix-weight", "0.5", "--ignore-eos"], {"mix_weight": 0.5, "block_size": 4, "eos_token_id": None}),
])
def test_other_samplers_match_the_library(checkpoint, capsys, sampler, extra, cfg):
    argv = ["--checkpoint", str(checkpoint), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--sampler", sampler,
            "--max-new-tokens", "8", "--json", *extra]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    same(report["results"], library(checkpoint, sampler, **{"max_new_tokens": 8, "eos_token_id": 2, **cfg}))


def test_prompts_file_and_plain_output(checkpoint, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps(PROMPTS[0]) + "\n\n" + json.dumps(PROMPTS[1]) + "\n")
    assert main(["--checkpoint", str(checkpoint), "--prompts-file", str(prompts_file), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "=== prompt 0: 'w1 w2 w3'" in out and "=== prompt 1: 'w7'" in out and "tokens/forward" in out


@pytest.mark.e2e
def test_decoder_imports_no_deepspeed_or_trainer():
    code = ("import sys, ar2diff.decode.cli, ar2diff.decode.tidar, ar2diff.decode.ar; "
            "bad = [m for m in sys.modules if m.startswith(('deepspeed', 'ar2diff.trainer'))]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def error_of(argv, capsys) -> str:
    """Run the CLI, expect failure (exit status != 0 from main or argparse), return stderr."""
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    assert status not in (0, None)
    return capsys.readouterr().err


def test_bad_inputs_give_clear_errors(checkpoint, tmp_path, capsys):
    ck = ["--checkpoint", str(checkpoint)]
    assert "prompt 1 is empty" in error_of(ck + ["--prompt", "w1", "--prompt", "  "], capsys)
    long_prompt = " ".join(["w1"] * 600)
    err = error_of(ck + ["--prompt", long_prompt], capsys)
    assert "600 tokens" in err and "max_position_embeddings" in err
    assert "invalid choice: 'beam'" in error_of(ck + ["--prompt", "w1", "--sampler", "beam"], capsys)
    assert "must lie in [0, 1]" in error_of(ck + ["--prompt", "w1", "--sampler", "mixing", "--mix-weight", "1.5"],
                                             capsys)
    assert "needs --mix-weight" in error_of(ck + ["--prompt", "w1", "--sampler", "mixing"], capsys)
    assert "applies only to --sampler mixing" in error_of(ck + ["--prompt", "w1", "--mix-weight", "0.3"], capsys)
    assert "no prompts" in error_of(ck, capsys)
    assert "comma-separated acceptance levels" in error_of(ck + ["--prompt", "w1", "--levels", "a,b"], capsys)
    assert "levels must be" in error_of(ck + ["--prompt", "w1", "--levels", "7"], capsys)
    assert "top_p" in error_of(ck + ["--prompt", "w1", "--top-p", "0"], capsys)
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text('"fine"\nnot json\n')
    assert "bad.jsonl:2 is not JSON" in error_of(ck + ["--prompts-file", str(bad_file)], capsys)
    bad_file.write_text('["a list"]\n')
    assert "bad.jsonl:1 holds a list, not a JSON string" in error_of(ck + ["--prompts-file", str(bad_file)], capsys)
    assert "does not exist" in error_of(["--checkpoint", str(tmp_path / "missing"), "--prompt", "w1"], capsys)


def test_checkpoint_without_tidar_metadata(tmp_path, capsys):
    no_mask = export_like(tmp_path / "no_mask", with_mask=False)
    err = error_of(["--checkpoint", str(no_mask), "--prompt", "w1"], capsys)
    assert "config.json has no mask_token_id" in err and "--sampler ar" in err
    assert main(["--checkpoint", str(no_mask), "--prompt", "w1", "--sampler", "ar", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    no_block = export_like(tmp_path / "no_block", with_block=False)
    assert "no tidar_block_size; pass --block-size" in error_of(["--checkpoint", str(no_block), "--prompt", "w1"],
                                                               capsys)
    assert main(["--checkpoint", str(no_block), "--prompt", "w1", "--block-size", "3", "--max-new-tokens", "2"]) == 0


def test_chat_template_wraps_each_prompt_as_a_user_turn(tmp_path, capsys):
    """--chat-template: the decoded continuation is that of the rendered chat (user turn + generation prompt), i.e.
    the same as decoding the rendered text as a plain prompt; a tokenizer without a template is a clear error."""
    folder = export_like(tmp_path / "sft")
    assert "has no chat template" in error_of(["--checkpoint", str(folder), "--prompt", "w1", "--chat-template"],
                                              capsys)
    tokenizer = make_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}w30 {{ m['content'] }} w31 {% endfor %}"
                               "{% if add_generation_prompt %}w32{% endif %}")
    tokenizer.save_pretrained(folder)
    args = ["--checkpoint", str(folder), "--max-new-tokens", "5", "--json", "--ignore-eos"]
    assert main([*args, "--prompt", "w5 w6", "--chat-template"]) == 0
    chat = json.loads(capsys.readouterr().out)["results"][0]
    assert main([*args, "--prompt", "w30 w5 w6 w31 w32"]) == 0
    plain = json.loads(capsys.readouterr().out)["results"][0]
    assert main([*args, "--prompt", "w5 w6"]) == 0
    bare = json.loads(capsys.readouterr().out)["results"][0]
    assert chat["token_ids"] == plain["token_ids"] and chat["token_ids"] != bare["token_ids"]


def test_levels_auto_from_eval_json_and_from_a_calibration_decode(checkpoint, tmp_path, capsys):
    """--levels auto: the levels chosen from eval.json's histogram are the ones decoded with, equal to the library
    choice; without eval.json a calibration decode (cpu: timed forwards) supplies the histogram."""
    from ar2diff.decode.levels import accelerator_cost, choose_levels
    from ar2diff.model.params import model_shape

    hist = [2, 1, 0, 9]  # block 4: mostly all three drafts accepted
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps({"settings": {"block_size": 4}, "samplers": {"lossless": {
        "acceptance_histogram": [5, 1, 0, 9]}}, "statistics": {"temperature_0": {"samplers": {"lossless": {
            "full_draft_histogram": hist}}}}}))
    base = ["--checkpoint", str(checkpoint), "--prompt", PROMPTS[0], "--max-new-tokens", "6", "--json",
            "--levels", "auto"]
    assert main([*base, "--hardware", "mi300x", "--histogram", str(eval_json), "--projection-batch", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    want = choose_levels(hist, 4, {"mi300x": accelerator_cost(model_shape(load_model(checkpoint)), "mi300x",
                                                              batch=64)})["mi300x"]
    auto = report["levels_auto"]
    assert auto["source"] == str(eval_json) and auto["histogram"] == hist
    assert auto["chosen"] == want["chosen"] and report["settings"]["levels"] == want["chosen"]["levels"]
    assert auto["chosen"]["speedup"] >= max(auto["all"]["speedup"], auto["zyphra"]["speedup"])
    assert main([*base, "--hardware", "cpu"]) == 0
    auto = json.loads(capsys.readouterr().out)["levels_auto"]
    assert auto["source"].startswith("calibration decode") and sum(auto["histogram"]) > 0
    assert set(auto["cpu_timing"]["seconds"]) == {"1", "7", "11", "19"} or set(auto["cpu_timing"]["seconds"]) == {
        1, 7, 11, 19}
    assert "--hardware" in error_of(base, capsys)
    assert "--hardware" in error_of(["--checkpoint", str(checkpoint), "--prompt", "w1", "--hardware", "h100"],
                                    capsys)
