"""The realistic parity benchmark: its bar can fail, and its quick mode runs end to end."""

from __future__ import annotations

import pytest

from benchmarks import realistic_parity as bench
from benchmarks.realistic_parity import Scores, Setting, main_table


def _scores(values: dict[str, list[float]]) -> Scores:
    scores = Scores()
    for category, runs in values.items():
        for v in runs:
            scores.add(category, [v, v, v])
    return scores


def test_bar_is_min_of_centralised_and_full_bank_less_slack_and_seed_range() -> None:
    setting = Setting("photos", None, None, ("a", "b"))  # type: ignore[arg-type]
    full = _scores({"a": [0.90], "b": [0.80]})
    central = _scores({"a": [0.92, 0.94], "b": [0.85, 0.85]})
    # a: floor = min(0.93, 0.90) - 0.01 - 0.02 = 0.87; b: min(0.85, 0.80) - 0.01 - 0 = 0.79
    federated = {
        ("iid", "coreset prefix-merge"): _scores({"a": [0.871, 0.871], "b": [0.79, 0.79]}),
        ("category", "coreset prefix-merge"): _scores({"a": [0.88, 0.88], "b": [0.7, 0.78]}),
        ("iid", "random"): _scores({"a": [0.1, 0.1], "b": [0.1, 0.1]}),
    }
    table, met = main_table(setting, full, central, federated, 10, 100)
    assert not met  # the category partition misses on b
    rows = [line for line in table.splitlines() if line.startswith("| federated")]
    assert rows[0].endswith("| yes |") and rows[1].endswith("| yes |")
    assert "NO: image AUROC < 0.7900" in rows[3]
    federated.pop(("category", "coreset prefix-merge"))
    assert main_table(setting, full, central, federated, 10, 100)[1]  # random does not count


@pytest.mark.slow
def test_quick_mode_runs_and_prints_the_parity_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert code in (0, 1)
    assert "Realistic parity (photos)" in out and "(quick)" in out
    for fragment in ("full bank (", "centralised (", "federated iid, coreset prefix-merge",
                     "federated iid, coreset farthest-first", "bytes up / round"):
        assert fragment in out
