"""Counts of what the pipeline kept and skipped, per reason, saved next to the packed rows."""
from dataclasses import dataclass, field

# Why a record was skipped. Every reader and the tokenizer step use exactly these strings.
BAD_JSON = "bad_json"            # a jsonl line that is not a JSON object
UNDECODABLE = "undecodable"      # bytes that are not UTF-8
MISSING_FIELD = "missing_field"  # the text / messages field is absent or null
WRONG_TYPE = "wrong_type"        # text not a string; messages not a list of {role, content} strings
EMPTY = "empty"                  # whitespace-only text or no messages
NO_ASSISTANT = "no_assistant"    # chat record without an assistant turn (nothing to learn)
TEMPLATE_ERROR = "template_error"  # chat template failed or did not render turn by turn
TOO_LONG = "too_long"            # more than data.max_doc_tokens tokens
REASONS = (BAD_JSON, UNDECODABLE, MISSING_FIELD, WRONG_TYPE, EMPTY, NO_ASSISTANT, TEMPLATE_ERROR, TOO_LONG)


@dataclass
class DataStats:
    """Kept documents/tokens/rows of one split and skipped records by reason."""

    docs: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    rows: int = 0
    pad_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "DataStats") -> "DataStats":
        """Sum of two stats (e.g. over sources)."""
        skipped = dict(self.skipped)
        for reason, n in other.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
        return DataStats(self.docs + other.docs, self.tokens + other.tokens,
                         self.loss_tokens + other.loss_tokens, self.rows + other.rows,
                         self.pad_tokens + other.pad_tokens, skipped)

    def to_dict(self) -> dict:
        return {"docs": self.docs, "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                "rows": self.rows, "pad_tokens": self.pad_tokens, "skipped": dict(sorted(self.skipped.items()))}

    @classmethod
    def from_dict(cls, d: dict) -> "DataStats":
        return cls(d["docs"], d["tokens"], d["loss_tokens"], d["rows"], d["pad_tokens"], dict(d["skipped"]))
