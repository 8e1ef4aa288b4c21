"""Hydra's (or OmegaConf's) composition error on one line: the config layer's, so every entry point words it the same
way (`python -m ar2diff.train` through `ar2diff.cli_errors`, `python -m ar2diff.data.prepare` directly)."""

from __future__ import annotations

from omegaconf.errors import OmegaConfBaseException

OVERRIDE_GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic"


def hydra_error_line(err: BaseException) -> str:
    """Hydra's (or OmegaConf's) composition error as one line naming the override, key or missing option.

    Hydra's own text spreads over several lines (the search path, the option list, OmegaConf's full_key /
    reference_type block); the facts a user needs are kept: the override or key, the reason, the options."""
    from hydra.errors import MissingConfigException, OverrideParseException

    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, OverrideParseException):
        detail = lines[0] if lines else "invalid syntax"
        if detail.startswith("Error parsing override") and len(lines) > 2:  # "Error parsing override 'X'" + reason
            detail = lines[1]
        if detail.startswith("LexerNoViableAltException:") and len(lines) > 1:  # "PREFIX: <override>" + a caret line
            column = str(err).splitlines()[1].index("^") - len("LexerNoViableAltException: ")
            detail = f"unexpected character at column {column + 1}"
        return f"cannot parse the override {err.override!r}: {detail}; see {OVERRIDE_GRAMMAR}"
    if isinstance(err, MissingConfigException):
        head = lines[0] if lines else f"could not find {err.missing_cfg_file!r}"
        if err.options and err.missing_cfg_file:
            group = err.missing_cfg_file.rsplit("/", 1)[0]
            return f"{head}; available options in '{group}': {', '.join(err.options)}"
        return head
    head, hints = (lines[0].rstrip(".") if lines else type(err).__name__), lines[1:]
    if not isinstance(err, OmegaConfBaseException):  # Hydra's text, then the first line of OmegaConf's reason
        cause = err.__cause__ or err.__context__
        if cause is not None and str(cause).strip():
            head += f": {str(cause).strip().splitlines()[0]}"
    else:
        hints = [h for h in hints if not h.startswith(("full_key:", "reference_type=", "object_type="))]
    return "; ".join([head, *(h[:1].lower() + h[1:] for h in hints)])
