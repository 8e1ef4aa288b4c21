"""Adding [MASK]: existing ids and rows untouched, tied/untied heads handled, survives save/reload."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ar2diff.model import add_mask_token, build_model
from tiny import TINY_CONFIGS, word_tokenizer


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("zaya", True), ("qwen3_moe", False)])
def test_mask_row_appended_without_disturbing_existing_rows(arch, tied, tmp_path):
    cfg = dict(TINY_CONFIGS[arch], tie_word_embeddings=tied)
    lm = build_model(cfg, seed=0)
    tok = word_tokenizer(cfg["vocab_size"])  # tokenizer fills the whole table: the mask row must be appended
    before_in = lm.get_input_embeddings().weight.detach().clone()
    before_out = lm.get_output_embeddings().weight.detach().clone()
    text = "w1 w5 w90"
    ids_before = tok(text)["input_ids"]

    mask_id = add_mask_token(lm, tok, block_size=16)

    assert mask_id == cfg["vocab_size"] and tok.mask_token == "[MASK]"
    assert tok(text)["input_ids"] == ids_before
    emb = lm.get_input_embeddings().weight
    assert emb.shape[0] == mask_id + 1 and lm.config.vocab_size == mask_id + 1
    assert torch.equal(emb[:mask_id], before_in)
    torch.testing.assert_close(emb[mask_id], before_in.mean(0))
    head = lm.get_output_embeddings().weight
    assert torch.equal(head[:mask_id], before_out)
    assert (head.data_ptr() == emb.data_ptr()) == tied
    assert lm.config.mask_token_id == mask_id and lm.config.tidar_block_size == 16

    lm.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert again.config.mask_token_id == mask_id and again.config.tidar_block_size == 16
    assert tok2.mask_token == "[MASK]" and tok2.mask_token_id == mask_id
    torch.testing.assert_close(again.get_input_embeddings().weight, emb)
    torch.testing.assert_close(again.get_output_embeddings().weight, head)


def test_spare_row_is_reused_and_adding_twice_is_idempotent():
    lm = build_model(TINY_CONFIGS["llama"], seed=0)
    tok = word_tokenizer(50)  # the model's table (97 rows) has spare rows
    first = add_mask_token(lm, tok, block_size=8)
    assert first == 50 and lm.get_input_embeddings().weight.shape[0] == 97
    row = lm.get_input_embeddings().weight[first].detach().clone()
    assert add_mask_token(lm, tok, block_size=8) == first
    assert torch.equal(lm.get_input_embeddings().weight[first], row)


def test_tokenizer_larger_than_model_is_rejected():
    lm = build_model(TINY_CONFIGS["llama"], seed=0)
    with pytest.raises(ValueError, match="tokenizer has 200 tokens but the model embeds only 97"):
        add_mask_token(lm, word_tokenizer(200), block_size=8)
