"""Checks on a model folder before transformers reads it, so a bad file is named in one line.

An ar2diff export (it has ``ar2diff.json``) must pass the export completeness check (marker present, every listed
file at its recorded size). A plain transformers checkpoint (a base model) has no marker: each ``*.safetensors``
header is read, which catches a truncated or non-safetensors file. A tokenizer folder needs its tokenizer files:
``tokenizer_config.json`` without ``tokenizer.json`` (or a sentencepiece/BPE vocabulary) would otherwise surface
as transformers' "install sentencepiece or tiktoken".
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def check_weights(folder: str | Path) -> None:
    """Raise ValueError naming the incomplete export or the unreadable safetensors file in `folder`."""
    from safetensors import SafetensorError, safe_open

    from ar2diff.checkpoint.export_layout import METADATA_NAME, _check_export

    folder = Path(folder)
    if (folder / METADATA_NAME).is_file():
        reason = _check_export(folder)
        if reason:
            raise ValueError(f"incomplete ar2diff export: {reason}")
        return
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file} is not a complete safetensors file ({err}); copy or download it again") from None


def check_tokenizer_files(folder: str | Path) -> None:
    """Raise FileNotFoundError if `folder` has a tokenizer config but no tokenizer vocabulary file."""
    folder = Path(folder)
    if (folder / "tokenizer_config.json").is_file() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder / 'tokenizer.json'} is missing (the folder has tokenizer_config.json but "
                                "no tokenizer vocabulary); copy the tokenizer files of this model into it")
