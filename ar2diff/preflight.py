"""Checks that run before any training: every phase of a pipeline is composed and its inputs looked at, so a bad
`inputs.chat_data` fails in seconds instead of after phases 1 and 2 have trained; and a re-run knows which phases
are already complete.

`check_phase_inputs` reads a sample of each local source: the files exist, records are readable (at least one
usable record in the first `SAMPLE_RECORDS`, named with its file and the skip reasons when none is), the source
is not empty, and when the phase-end decoder check is on, the held-out split has at least one record (computed
exactly for the stdlib and for local files below `EXACT_LIMIT_BYTES`; larger sources are sure to have some).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ar2diff.checkpoint.export_layout import is_complete_export
from ar2diff.config.schema import PhaseConfig
from ar2diff.data import stats as S
from ar2diff.data.cache import digest
from ar2diff.data.sources import file_format, in_heldout, resolve_files, stdlib_files, validate_record

SAMPLE_RECORDS = 200
EXACT_LIMIT_BYTES = 64 << 20
DONE_FILES = ("summary.json",)


def _jsonl_sample(files: list[Path], src, chat: bool, limit: int | None) -> tuple[list, Counter]:
    """Usable documents and skip reasons of the first `limit` non-blank lines (all when None)."""

    docs, reasons, seen = [], Counter(), 0
    for f in files:
        with open(f, "rb") as fh:
            for raw in fh:
                if not raw.strip():
                    continue
                seen += 1
                try:
                    doc, reason = validate_record(json.loads(raw.decode("utf-8")), src, chat)
                except UnicodeDecodeError:
                    doc, reason = None, S.UNDECODABLE
                except ValueError:
                    doc, reason = None, S.BAD_JSON
                if reason:
                    reasons[reason] += 1
                else:
                    docs.append(doc)
                if limit is not None and seen >= limit:
                    return docs, reasons
    return docs, reasons


def _check_files_source(src, key: str, cfg: PhaseConfig) -> None:

    files = resolve_files(src.path, f"{key}.path")
    empty = [str(f) for f in files if f.stat().st_size == 0]
    if len(empty) == len(files):
        raise ValueError(f"{key}.path={src.path!r}: {', '.join(empty[:3])} is empty (0 bytes); give a file with "
                         "records")
    fmt = file_format(src, files)
    if fmt != "jsonl":
        return
    small = sum(f.stat().st_size for f in files) <= EXACT_LIMIT_BYTES
    docs, reasons = _jsonl_sample(files, src, cfg.data.chat, None if small else SAMPLE_RECORDS)
    if not docs:
        field = src.messages_field if cfg.data.chat else src.text_field
        raise ValueError(f"{key}.path={src.path!r}: no usable record in {files[0]}"
                         f"{' and others' if len(files) > 1 else ''} (skipped: {dict(reasons) or 'none read'}); "
                         f"check the file and {key}.{'messages_field' if cfg.data.chat else 'text_field'}={field!r}")
    if small and _needs_heldout(cfg) and not any(in_heldout(digest(d, 32), cfg.data.heldout_fraction)
                                                  for d in docs):
        raise ValueError(f"{key}.path={src.path!r}: the held-out split is empty ({len(docs)} records, "
                         f"data.heldout_fraction={cfg.data.heldout_fraction}) and the phase-end decoder check "
                         "needs it: raise data.heldout_fraction or set decoder.enabled=false")


def _needs_heldout(cfg: PhaseConfig) -> bool:
    return cfg.decoder.enabled and cfg.objective.kind == "tidar"


def _check_stdlib_source(src, key: str, cfg: PhaseConfig) -> None:
    rels = stdlib_files(src.path)
    if not rels:
        raise ValueError(f"{key}.path={src.path!r} matches no stdlib file")
    if _needs_heldout(cfg) and not any(in_heldout(r, cfg.data.heldout_fraction) for r in rels):
        raise ValueError(f"{key}.path={src.path!r}: the held-out split is empty ({len(rels)} stdlib files, "
                         f"data.heldout_fraction={cfg.data.heldout_fraction}) and the phase-end decoder check "
                         "needs it: raise data.heldout_fraction or set decoder.enabled=false")


def check_phase_inputs(cfg: PhaseConfig, label: str = "") -> None:
    """Raise ValueError (prefixed with `label`, e.g. "phase 3 (diffusion_sft): ") naming the first bad input."""
    try:
        if cfg.model.path is not None and not Path(cfg.model.path).is_dir():
            raise ValueError(f"model.path={cfg.model.path!r} is not a folder")
        if cfg.data.tokenizer_path and not Path(cfg.data.tokenizer_path).is_dir():
            raise ValueError(f"data.tokenizer_path={cfg.data.tokenizer_path!r} is not a folder")
        for i, src in enumerate(cfg.data.sources):
            key = f"data.sources[{i}]"
            if src.kind == "files":
                _check_files_source(src, key, cfg)
            elif src.kind in ("stdlib", "stdlib_chat"):
                _check_stdlib_source(src, key, cfg)
    except ValueError as err:
        raise ValueError(f"{label}{err}") from None


def phase_complete(phase_dir: str | Path, cfg: PhaseConfig) -> bool:
    """True when `phase_dir` holds a complete export, its summary, and (if the decoder check is on) eval.json:
    a re-run has nothing left to do for this phase."""
    phase_dir = Path(phase_dir)
    needed = [phase_dir / "summary.json"] + ([phase_dir / "eval.json"] if _needs_heldout(cfg) else [])
    return is_complete_export(phase_dir / "export") and all(p.is_file() for p in needed)
