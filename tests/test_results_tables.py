"""README's and docs/results.md's results tables say what the files they cite hold.

Each row of a table with an `Outputs` column names its runs as a glob under results/
(`results/<folder>/<variant>_seed*`); its ACC, BWT (mean ± sample std over the runs, in
%), seeds and wall times must be those of the runs' results.json files.
"""

import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "docs/results.md")


def _cells(line: str) -> list[str]:
  return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _cited_rows(document: str) -> list[tuple[int, dict[str, str]]]:
  """(line number, {header: cell}) of every row that cites its outputs."""
  rows, header = [], None
  for number, line in enumerate((ROOT / document).read_text().splitlines(), start=1):
    if not line.startswith("|"):
      header = None
    elif header is None:
      header = _cells(line)
    elif not set(line) <= set("|-: "):
      row = dict(zip(header, _cells(line), strict=True))
      if row.get("Outputs"):
        rows.append((number, row))
  return rows


def _mean_std(values: list[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _minutes(seconds) -> str:
  return "n/a" if seconds is None else f"{seconds / 60:.0f}"


ROWS = [(document, *row) for document in DOCUMENTS for row in _cited_rows(document)]


def test_the_tables_cite_their_outputs():
  assert {document for document, *_ in ROWS} == set(DOCUMENTS)


@pytest.mark.parametrize("document, line, row", ROWS, ids=[f"{d}:{n}" for d, n, _ in ROWS])
def test_each_cited_row_is_what_its_files_hold(document, line, row):
  pattern = row["Outputs"].strip("`")
  assert pattern.startswith("results/"), f"{document}:{line} cites {pattern}"
  files = sorted(ROOT.glob(f"{pattern}/results.json"))
  assert files, f"{document}:{line}: no results.json under {pattern}"
  runs = [json.loads(f.read_text()) for f in files]
  assert {r["tasks_completed"] for r in runs} == {len(runs[0]["accuracy_matrix"])}
  assert row["ACC (%)"].strip("*") == _mean_std([100 * r["acc"] for r in runs])
  assert row["BWT (%)"].strip("*") == _mean_std([100 * r["bwt"] for r in runs])
  if "Seeds" in row:
    assert row["Seeds"] == ", ".join(str(r["config"]["seed"]) for r in runs)
  wall = next(value for key, value in row.items() if key.startswith("Wall time"))
  if wall:
    assert wall == ", ".join(_minutes(r["wall_seconds"]) for r in runs) + " min"
