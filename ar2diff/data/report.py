"""What each source contributed, said at preparation time: kept and skipped records by reason, and warnings when a
source is mostly skipped or the token budget repeats it many times (a chat file of mostly bad records must not
train 4 epochs on 8 rows in silence).
"""

from __future__ import annotations

import logging

from .stats import DataStats

log = logging.getLogger(__name__)

MAX_SKIPPED_SHARE = 0.10  # warn when more than this share of a source's records is skipped
MAX_EPOCHS = 4.0  # warn when the budget goes over a source more than this many times


def source_lines(stats: dict[str, DataStats]) -> list[str]:
    """One line per source: documents kept, tokens, rows, and skipped records by reason."""
    lines = []
    for name, s in stats.items():
        skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(s.skipped.items()) if n) or "none"
        lines.append(f"[data] {name}: kept {s.docs:,} documents ({s.tokens:,} tokens, {s.rows:,} rows); "
                     f"skipped {s.total_skipped:,} ({skipped})")
    return lines


def source_warnings(stats: dict[str, DataStats], train_rows: dict[str, int], weights: dict[str, float],
                    budget_rows: int) -> list[str]:
    """Warnings for sources skipped above MAX_SKIPPED_SHARE or repeated above MAX_EPOCHS by a budget of
    `budget_rows` training rows (sampled by weight, data/loader.py mixture_order)."""
    out = []
    total_weight = sum(weights.values())
    for name, s in stats.items():
        records = s.docs + s.total_skipped
        if records and s.total_skipped / records > MAX_SKIPPED_SHARE:
            reasons = dict(sorted(s.skipped.items()))
            out.append(f"data source {name}: {s.total_skipped:,} of {records:,} records skipped "
                       f"({s.total_skipped / records:.0%} > {MAX_SKIPPED_SHARE:.0%}): {reasons}; "
                       "check the file's format and the source's text_field/messages_field")
        rows = train_rows.get(name, 0)
        if rows:
            epochs = budget_rows * weights[name] / total_weight / rows
            if epochs > MAX_EPOCHS:
                out.append(f"data source {name}: the budget goes over its {rows:,} train rows {epochs:.1f} times "
                           f"(> {MAX_EPOCHS:g}); add data or lower budget.tokens")
    return out


def report_sources(train, heldout, budget_rows: int, print_fn=print, rank: int = 0) -> list[str]:
    """Print the per-source lines and warnings (rank 0) for the packed train/held-out datasets; returns warnings."""
    stats = {name: train.stats[name].merge(heldout.stats[name]) for name in train.names}
    train_rows = dict(zip(train.names, train.sizes))
    warnings = source_warnings(stats, train_rows, dict(zip(train.names, train.weights)), budget_rows)
    if rank == 0:
        for line in source_lines(stats):
            print_fn(line)
        for message in warnings:
            log.warning("%s", message)
    return warnings
