"""Chat (SFT) records -> token ids and a loss mask that is True exactly on assistant responses.

Works with any chat template that renders turn by turn: the assistant span of turn i is the text
between rendering messages[:i] with the generation prompt and rendering messages[:i+1]; it covers the
response and the template's end-of-turn marker. Token offsets map those character spans to tokens: a
token is a response token iff it starts inside a span.
"""
from typing import Any


class TemplateError(ValueError):
    """The chat template failed, or did not render a conversation as a prefix of the next turn."""


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TemplateError(f"chat template returned {type(text).__name__}, expected str")
    return text


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, [(start, end) character span of each assistant turn])."""
    try:
        full = _render(tokenizer, messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = _render(tokenizer, messages[:i], generation_prompt=True)
            upto = _render(tokenizer, messages[: i + 1])
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise TemplateError(f"turn {i} does not render as a prefix of the conversation")
            spans.append((len(prompt), len(upto)))
    except TemplateError:
        raise
    except Exception as e:  # jinja errors, raise_exception() in templates, ...
        raise TemplateError(f"chat template failed: {e}") from e
    return full, spans


def encode_chat(tokenizer, messages: list[dict[str, Any]]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and its assistant loss mask (same length)."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s <= start < e for s, e in spans) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask
