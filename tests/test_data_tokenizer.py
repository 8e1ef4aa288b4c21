"""Tokenizer: trained once and cached, special tokens; SFT: the loss mask covers exactly the assistant tokens."""
import json

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from ar2diff.data import DataConfig, SourceConfig, encode_chat, get_tokenizer, load_packed, load_tokenizer
from ar2diff.data import tokenizer as tokenizer_mod
from ar2diff.data.sources import read_stdlib_file


def _cfg(cache, **kw):
    base = dict(seq_len=32, heldout_fraction=0.0, bpe_vocab_size=512, bpe_max_bytes=200_000, cache_dir=str(cache))
    return DataConfig(**{**base, **kw}).validate()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return get_tokenizer(_cfg(tmp_path_factory.mktemp("cache")))


def test_bpe_is_cached_not_retrained(tmp_path, monkeypatch):
    calls = []
    real_train = tokenizer_mod.train_bpe
    monkeypatch.setattr(tokenizer_mod, "train_bpe", lambda *a: calls.append(a) or real_train(*a))
    first = get_tokenizer(_cfg(tmp_path))
    (folder,) = (tmp_path / "tokenizer").iterdir()
    assert folder.name.startswith("bpe-v512-py") and len(calls) == 1
    mtime = (folder / "tokenizer.json").stat().st_mtime_ns
    second = get_tokenizer(_cfg(tmp_path))
    assert len(calls) == 1 and (folder / "tokenizer.json").stat().st_mtime_ns == mtime
    assert second.get_vocab() == first.get_vocab() and second.chat_template == first.chat_template
    get_tokenizer(_cfg(tmp_path, bpe_vocab_size=600))  # another key trains again
    assert len(calls) == 2 and len(list((tmp_path / "tokenizer").iterdir())) == 2


def test_bpe_special_tokens_and_lossless_bytes(tok):
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == 512
    ids = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]
    assert len(set(ids)) == 4 and None not in ids
    for role in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert len(tok(role, add_special_tokens=False)["input_ids"]) == 1
    text = read_stdlib_file("json/decoder.py")[0] + "\n# ünïcödé ✓ \t\r\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and tok.unk_token_id not in ids


def test_local_tokenizer_folder(tok, tmp_path):
    tok.save_pretrained(str(tmp_path / "t"))
    loaded = get_tokenizer(_cfg(tmp_path, tokenizer_path=str(tmp_path / "t")))
    assert loaded.get_vocab() == tok.get_vocab() and loaded.eos_token_id == tok.eos_token_id
    with pytest.raises(ValueError, match="data.tokenizer_path"):
        load_tokenizer(str(tmp_path / "missing"))


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4, since\n2+2=4."}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": " 6"}]


def test_sft_mask_is_exactly_the_assistant_tokens(tok):
    ids, mask = encode_chat(tok, CONVERSATION)
    assert len(ids) == len(mask)
    ids, mask = np.asarray(ids), np.asarray(mask)
    eos = tok.eos_token_id
    answers = [tok(m["content"], add_special_tokens=False)["input_ids"] + [eos]
               for m in CONVERSATION if m["role"] == "assistant"]
    assert ids[mask].tolist() == answers[0] + answers[1]  # responses incl. their end-of-turn token
    # the mask is two contiguous runs, each directly after an <|assistant|> token
    runs = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0]))
    starts = runs[::2]
    assert len(starts) == 2 and all(ids[s - 1] == tok.convert_tokens_to_ids("<|assistant|>") for s in starts)
    assert tok.decode(ids[~mask].tolist()).count("Be brief.") == 1


def test_sft_mask_with_another_template(tok):
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok2 = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token=tok.eos_token)
    tok2.chat_template = chatml
    ids, mask = encode_chat(tok2, CONVERSATION)
    ids, mask = np.asarray(ids), np.asarray(mask)
    runs = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0])).reshape(-1, 2)
    assert [tok2.decode(ids[a:b].tolist()) for a, b in runs] == ["4, since\n2+2=4.<|im_end|>\n", " 6<|im_end|>\n"]


def test_sft_packed_rows_carry_the_mask(tok, tmp_path):
    convs = [CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "x" * 40},
                                               {"role": "assistant", "content": "long " * 20}]]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"messages": c}) for c in convs))
    cfg = _cfg(tmp_path, chat=True, sources=[SourceConfig(kind="files", path=str(tmp_path / "chat.jsonl"))])
    data = load_packed(cfg, tok, "train")
    rows = data.rows(range(len(data)))
    real = rows["doc_ids"] >= 0
    expected_ids, expected_mask = [], []
    for c in convs:
        ids, mask = encode_chat(tok, c)
        expected_ids += ids
        expected_mask += mask
    assert rows["input_ids"][real].tolist() == expected_ids  # conversations end with EOS: no extra separator
    assert rows["loss_mask"][real].tolist() == expected_mask
    assert not rows["loss_mask"][~real].any()
    assert data.stats["chat.jsonl"].loss_tokens == sum(expected_mask)
