"""Settings of the quality measurements in the phase-end check (`decoder.quality.*`): base-relative losses,
pass@k of held-out continuations, loss by position after context extension."""

from __future__ import annotations

from dataclasses import dataclass, field

from ar2diff.config.data import SourceConfig, validate_source


@dataclass
class QualityEvalConfig:
    """enabled: all of it (off: the phase-end check is the decoder check alone).
    base_relative: score the phase's start checkpoint and the pipeline's original base on the same rows: the
    first `reference_rows` rows of the fixed pretraining held-out set (and the phase's own held-out loss rows for
    a chat phase).
    passk_*: `passk_prompts` prompts of decoder.prompt_len tokens, target = the next `target_len` tokens,
    `passk_samples` samples per prompt and sampler at `passk_temperature`, pass@k for k in `passk_k`, intervals at
    `confidence`. position_buckets: after context_extension, AR loss by position for start and end checkpoints.
    out_of_domain: text sources the run never trains on (e.g. [{kind: stdlib_docs}], English prose for a code
    run), scored like the pretraining set (`reference_rows` rows of their held-out half), so that forgetting
    outside the training domain shows; every AR-loss delta gets a paired interval over rows.
    """

    enabled: bool = True
    base_relative: bool = True
    reference_rows: int = 16
    passk: bool = True
    passk_prompts: int = 16
    passk_samples: int = 8
    passk_k: list[int] = field(default_factory=lambda: [1, 4, 8])
    passk_temperature: float = 1.0
    target_len: int = 4
    confidence: float = 0.95
    position_buckets: bool = True
    out_of_domain: list[SourceConfig] = field(default_factory=list)

    def validate(self, seq_len: int, prompt_len: int) -> None:
        if min(self.passk_samples, self.passk_prompts, self.target_len, self.reference_rows) < 1:
            raise ValueError("decoder.quality.passk_samples, passk_prompts, target_len and reference_rows must be "
                             ">= 1")
        if not self.passk_k or any(not 1 <= k <= self.passk_samples for k in self.passk_k):
            raise ValueError(f"decoder.quality.passk_k={self.passk_k} must be non-empty with every k in "
                             f"[1, passk_samples={self.passk_samples}]")
        if not self.passk_temperature > 0:
            raise ValueError(f"decoder.quality.passk_temperature={self.passk_temperature} must be > 0 (pass@k "
                             "needs distinct samples)")
        if not 0 < self.confidence < 1:
            raise ValueError(f"decoder.quality.confidence={self.confidence} must lie in (0, 1)")
        for i, src in enumerate(self.out_of_domain):
            validate_source(src, f"decoder.quality.out_of_domain[{i}]", chat=False)
        if prompt_len + self.target_len > seq_len:
            raise ValueError(f"decoder.prompt_len + decoder.quality.target_len = {prompt_len + self.target_len} "
                             f"exceeds data.seq_len={seq_len}")
