"""What each source contributed, said at preparation time: kept and skipped records by reason, and warnings when a
source is mostly skipped or the token budget repeats it many times (a chat file of mostly bad records must not
train 4 epochs on 8 rows in silence).
"""

from __future__ import annotations

import logging

from .stats import DataStats

log = logging.getLogger(__name__)

MAX_SKIPPED_SHARE = 0.10  # warn when more than this share of a source's records is skipped


def source_lines(stats: dict[str, DataStats], train_rows: dict[str, int], weights: dict[str, float],
                 budget_rows: int) -> list[str]:
    """One line per source: documents kept (tokens, train rows), skipped records by reason, and the share of a
    budget of `budget_rows` training rows it gets by weight, with the epochs over its train rows that implies."""
    lines, total_weight = [], sum(weights.values())
    for name, s in stats.items():
        skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(s.skipped.items()) if n) or "none"
        share = weights[name] / total_weight
        epochs = budget_rows * share / max(train_rows.get(name, 0), 1)
        lines.append(f"[data] {name}: kept {s.docs:,} documents ({s.tokens:,} tokens, {train_rows.get(name, 0):,} "
                     f"train rows); skipped {s.total_skipped:,} ({skipped}); weight {weights[name]:g} -> "
                     f"{share:.1%} of the budget, {epochs:.2f} epochs")
    return lines


def source_warnings(stats: dict[str, DataStats], train_rows: dict[str, int], weights: dict[str, float],
                    budget_rows: int, max_repeats: float) -> list[str]:
    """Warnings for sources skipped above MAX_SKIPPED_SHARE or repeated more than `max_repeats` (data.max_repeats)
    times by a budget of `budget_rows` training rows (sampled by weight, data/loader.py mixture_order)."""
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
            if epochs > max_repeats:
                out.append(f"data source {name}: the budget goes over its {rows:,} train rows {epochs:.1f} times "
                           f"(> data.max_repeats={max_repeats:g}); add data, lower its weight or budget.tokens")
    return out


def report_sources(train, heldout, budget_rows: int, max_repeats: float, print_fn=print, rank: int = 0) -> list[str]:
    """Print the per-source lines and warnings (rank 0) for the packed train/held-out datasets; returns warnings."""
    stats = {name: train.stats[name].merge(heldout.stats[name]) for name in train.names}
    train_rows, weights = dict(zip(train.names, train.sizes)), dict(zip(train.names, train.weights))
    warnings = source_warnings(stats, train_rows, weights, budget_rows, max_repeats)
    if rank == 0:
        print_fn(f"[data] {len(stats)} source(s) for a budget of {budget_rows:,} rows of {train.seq_len:,} tokens:")
        for line in source_lines(stats, train_rows, weights, budget_rows):
            print_fn(line)
        for message in warnings:
            log.warning("%s", message)
    return warnings
