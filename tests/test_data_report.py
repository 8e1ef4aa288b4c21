"""One start-up report per source: kept/skipped records by reason, its share of the budget and the epochs that
implies, with warnings for mostly-skipped and over-repeated sources."""

from ar2diff.data.report import source_lines, source_warnings
from ar2diff.data.stats import DataStats

ROWS, WEIGHTS = {"web": 40, "chat": 8}, {"web": 1.0, "chat": 1.0}


def test_report_names_reasons_and_warns_above_the_stated_shares():
    stats = {"web": DataStats(docs=90, tokens=9000, rows=40, skipped={"bad_json": 10}),
             "chat": DataStats(docs=8, tokens=800, rows=8, skipped={"wrong_type": 70, "bad_json": 22})}
    lines = source_lines(stats, ROWS, WEIGHTS, budget_rows=80)
    assert lines[0] == ("[data] web: kept 90 documents (9,000 tokens, 40 train rows); skipped 10 (bad_json 10); "
                        "weight 1 -> 50.0% of the budget, 1.00 epochs")
    assert "skipped 92 (bad_json 22, wrong_type 70)" in lines[1] and lines[1].endswith("5.00 epochs")
    warnings = source_warnings(stats, ROWS, WEIGHTS, budget_rows=80, max_repeats=4.0)
    assert len(warnings) == 2
    assert warnings[0].startswith("data source chat: 92 of 100 records skipped (92% > 10%)")
    assert "goes over its 8 train rows 5.0 times (> data.max_repeats=4)" in warnings[1]
    assert source_warnings(stats, ROWS, WEIGHTS, budget_rows=40, max_repeats=4.0) == [
        warnings[0]]  # 2.5 epochs of chat: no repetition warning
    assert len(source_warnings(stats, ROWS, WEIGHTS, budget_rows=80, max_repeats=6.0)) == 1  # the key is honoured
