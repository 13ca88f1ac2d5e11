"""The toy's tables (toy/README.md, README.md) equal what toy/results gives (toy/tables.py), and
every result names the commit, flags and seed that made it."""
import re
import subprocess

import pytest

from conftest import ROOT
from toy import ablation, tables


def test_every_table_equals_its_rendering_from_the_results():
    results = tables.load_results()
    blocks = 0
    for path in tables.FILES:
        text = open(path).read()
        blocks += len(tables.BLOCK.findall(text))
        assert tables.rewrite(text, results) == text, f"run python toy/tables.py ({path})"
    assert blocks >= 3


def test_every_result_names_its_commit_flags_and_seed():
    results = tables.load_results()
    assert results
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True)
    for (row, seed), result in results.items():
        assert re.fullmatch("[0-9a-f]{40}", result["commit"]) and not result["dirty"], row
        # the row as toy/ablation.py runs it today, at its default threads, no extra flags
        assert result["flags"] == ablation.ROWS[row][1], row
        assert result["threads"] == 1 and result["extra"] == [], row
        assert result["evals"][-1]["step"] == int(dict(zip(
            result["flags"], result["flags"][1:])).get("--max_steps", 80)), row
        known = subprocess.run(["git", "cat-file", "-e", f"{result['commit']}^{{commit}}"],
                               cwd=ROOT, capture_output=True)
        if git.returncode == 0 and known.returncode == 0:  # (a checkout with that history)
            ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", result["commit"],
                                       "HEAD"], cwd=ROOT)
            assert ancestor.returncode == 0, (row, seed, result["commit"])


def _result(row, seed, final, series=None):
    return {"row": row, "seed": seed, "commit": f"{seed}" * 40,
            "evals": [{"step": 0, "unguided": 0.3, "guided": 1.0},
                      {"step": 80, "unguided": final, "guided": 0.5}],
            "generalisation": dict.fromkeys(tables.SPLITS, final),
            "series": {"entropy": [0.2] + [0.1] * 9 + [0.05] * 10, "late/clip_ratio": [],
                       "late/kd/ratio_out_frac": [], "late/kd/kl_clip_frac": [], **(series or {})}}


def test_a_row_by_hand():
    """Two seeds at 90 % and 100 %: mean 95.0, sample sd 7.1; entropy 0.2 at the first step, 0.05
    over the last 10; late fractions the mean of the first 20 steps over seeds."""
    late = {"late/kd/ratio_out_frac": [0.02] * 20 + [1.0], "late/clip_ratio": [0.004] * 30}
    results = {("sgpo_k2", s): _result("sgpo_k2", s, f, late) for s, f in ((0, 0.9), (1, 1.0))}
    (line,) = tables.proximal(results)[2:]
    assert line == ("| SGPO | 2 | 95.0 +- 7.1 | 90.0 / 100.0 | 50.0 +- 0.0 | 0.200 -> 0.050 "
                    "| 2.0 % / 0.4 % / - | 0000000, 1111111 |")


def test_check_mode_finds_a_stale_table(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("x\n<!-- table budget -->\n| old |\n<!-- end table -->\ny\n")
    monkeypatch.setattr(tables, "FILES", [str(page)])
    monkeypatch.setattr(tables, "figure", lambda: None)  # (toy/ablation.png stays)
    monkeypatch.setattr("sys.argv", ["tables.py", "--check"])
    assert tables.main() == 1 and "| old |" in page.read_text()
    monkeypatch.setattr("sys.argv", ["tables.py"])
    assert tables.main() == 0
    text = page.read_text()
    assert "| old |" not in text and text.startswith("x\n<!-- table budget -->\n| row |")
    assert text.endswith("<!-- end table -->\ny\n")
    monkeypatch.setattr("sys.argv", ["tables.py", "--check"])
    assert tables.main() == 0


@pytest.mark.parametrize("row", ["sgpo_k4", "sgpo_250", "sft_full_80"])
def test_rows_the_tables_name_exist(row):
    assert row in ablation.ROWS
