"""The report of finished runs: recomputed metrics, seed statistics, groups, plots, errors."""

import json
import os
import subprocess
import sys

import matplotlib.image
import pytest

from mark_jax import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Stored metrics are deliberately wrong: the report must recompute them from the matrix.
THREE_TASKS = [[0.90, None, None], [0.85, 0.80, None], [0.84, 0.79, 0.95]]


def _config(seed: int = 48, **overrides) -> dict:
  config = {
    "dataset": "synthetic",
    "seed": seed,
    "meta_rounds": 1,
    "use_masks": True,
    "mask_bias_init": None,
    "synthetic": {"num_classes": 6, "seed": 0},
    "restore_dir": f"/runs/{seed}",
  }
  config.update(overrides)
  return config


def _write_run(directory, matrix, config=None, wall_seconds=600.0, **fields) -> str:
  """Writes directory/results.json as a training run would; returns the directory."""
  os.makedirs(directory, exist_ok=True)
  results = {
    "accuracy_matrix": matrix,
    "tasks_completed": len(matrix),
    "acc": 0.123,
    "bwt": 0.456,
    "forgetting": [0.789] * (len(matrix) - 1),
    "wall_seconds": wall_seconds,
    "config": config or _config(),
    **fields,
  }
  with open(os.path.join(directory, "results.json"), "w") as f:
    json.dump(results, f)
  return str(directory)


def _report(tmp_path, workdirs, labels=None) -> tuple[str, str, dict]:
  """(main table, report.md, report.json) of the runs, written to tmp_path/out."""
  out = tmp_path / "out"
  table = report.build_report(workdirs, str(out), labels)
  with open(out / "report.json") as f:
    summaries = json.load(f)
  return table, (out / "report.md").read_text(), summaries


def test_metrics_are_recomputed_from_the_matrix(tmp_path):
  workdir = _write_run(tmp_path / "run", THREE_TASKS)
  table, markdown, summaries = _report(tmp_path, [workdir])
  summary = summaries["synthetic"]
  assert summary["acc_mean"] == pytest.approx(0.86)  # (0.84 + 0.79 + 0.95) / 3
  assert summary["bwt_mean"] == pytest.approx(-0.035)  # ((0.84 - 0.90) + (0.79 - 0.80)) / 2
  # Task 0: max(0.90, 0.85) - 0.84; task 1: 0.80 - 0.79; none for the last task.
  assert summary["forgetting_mean"] == pytest.approx([0.06, 0.01])
  assert summary["final_accuracy_mean"] == pytest.approx([0.84, 0.79, 0.95])
  assert summary["acc_std"] is None
  assert "| synthetic | 1 (48) | 3/3 | 86.0 | -3.5 | 10.0 min |" in table
  assert "| 0 | 84.0 | 6.0 |" in markdown
  assert "| 1 | 79.0 | 1.0 |" in markdown
  assert "| 2 | 95.0 | – |" in markdown
  assert table in markdown


def test_seeds_aggregate_as_mean_and_sample_std(tmp_path):
  # Seed 48: ACC (0.7 + 0.9) / 2 = 0.8, BWT 0.7 - 0.9 = -0.2.
  # Seed 49: ACC (0.8 + 1.0) / 2 = 0.9, BWT 0.8 - 0.9 = -0.1.
  # Sample std of two values a, b is |a - b| / sqrt(2): 0.1 / 1.41421 = 0.0707107.
  first = _write_run(tmp_path / "s48", [[0.9, None], [0.7, 0.9]], _config(48), wall_seconds=600)
  second = _write_run(tmp_path / "s49", [[0.9, None], [0.8, 1.0]], _config(49), wall_seconds=1200)
  table, _, summaries = _report(tmp_path, [first, second])
  summary = summaries["synthetic"]
  assert summary["seeds"] == [48, 49]
  assert summary["acc_mean"] == pytest.approx(0.85)
  assert summary["acc_std"] == pytest.approx(0.0707107)
  assert summary["bwt_mean"] == pytest.approx(-0.15)
  assert summary["bwt_std"] == pytest.approx(0.0707107)
  assert summary["final_accuracy_std"] == pytest.approx([0.0707107, 0.0707107])
  assert summary["forgetting_mean"] == pytest.approx([0.15])  # (0.2 + 0.1) / 2
  assert summary["wall_seconds_mean"] == pytest.approx(900.0)
  assert summary["workdirs"] == [os.path.abspath(first), os.path.abspath(second)]
  assert "| synthetic | 2 (48, 49) | 2/2 | 85.0 ± 7.1 | -15.0 ± 7.1 | 15.0 min |" in table


def test_variants_form_groups_labelled_by_the_differing_key(tmp_path):
  masks = [_write_run(tmp_path / f"masks{s}", THREE_TASKS, _config(s)) for s in (48, 49)]
  no_masks = _write_run(tmp_path / "no_masks", THREE_TASKS, _config(48, use_masks=False))
  _, _, summaries = _report(tmp_path, [masks[0], no_masks, masks[1]])
  assert list(summaries) == ["use_masks=True", "use_masks=False"]
  assert summaries["use_masks=True"]["seeds"] == [48, 49]
  assert summaries["use_masks=False"]["seeds"] == [48]


def test_a_key_added_after_a_run_counts_as_the_value_it_ran_with(tmp_path):
  before = _write_run(tmp_path / "before", THREE_TASKS, _config(48))  # no such key then
  running = _write_run(
    tmp_path / "running", THREE_TASKS, _config(49, feature_bn_statistics="running")
  )
  recomputed = _write_run(
    tmp_path / "recomputed", THREE_TASKS, _config(48, feature_bn_statistics="recomputed")
  )
  _, _, summaries = _report(tmp_path, [before, running, recomputed])
  assert list(summaries) == ["feature_bn_statistics=running", "feature_bn_statistics=recomputed"]
  assert summaries["feature_bn_statistics=running"]["seeds"] == [48, 49]


def test_nested_config_keys_label_groups_by_dotted_name(tmp_path):
  six = _write_run(tmp_path / "six", THREE_TASKS, _config(synthetic={"num_classes": 6, "seed": 0}))
  ten = _write_run(tmp_path / "ten", THREE_TASKS, _config(synthetic={"num_classes": 10, "seed": 0}))
  _, _, summaries = _report(tmp_path, [six, ten])
  assert list(summaries) == ["synthetic.num_classes=6", "synthetic.num_classes=10"]


def test_labels_flag_names_groups_in_order_of_appearance(tmp_path):
  masks = _write_run(tmp_path / "masks", THREE_TASKS, _config())
  no_masks = _write_run(tmp_path / "no_masks", THREE_TASKS, _config(use_masks=False))
  table, _, summaries = _report(tmp_path, [masks, no_masks], labels=["MARK", "no masks"])
  assert list(summaries) == ["MARK", "no masks"]
  assert table.splitlines()[2].startswith("| MARK |")


def test_pngs_are_valid_images_with_one_panel_per_group(tmp_path):
  matrix = [[0.5 + 0.02 * u if u <= t else None for u in range(20)] for t in range(20)]
  workdirs = [
    _write_run(tmp_path / "masks", matrix, _config()),
    _write_run(tmp_path / "no_masks", matrix, _config(use_masks=False)),
  ]
  _report(tmp_path, workdirs)
  for name in ("accuracy_matrix.png", "accuracy_over_time.png"):
    path = tmp_path / "out" / name
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(path).shape
    assert 400 < height < 2000, name
    assert 2 * height < width < 4000, name  # two panels side by side


def test_partial_run_is_reported_as_partial(tmp_path):
  matrix = [[0.9, None, None, None], [0.7, 0.8, None, None]]
  workdir = _write_run(tmp_path / "run", matrix)
  table, _, summaries = _report(tmp_path, [workdir])
  summary = summaries["synthetic"]
  assert summary["partial"] is True
  assert (summary["tasks_completed"], summary["num_tasks"]) == (2, 4)
  assert summary["acc_mean"] == pytest.approx(0.75)  # (0.7 + 0.8) / 2 over completed tasks
  assert "| 2/4 (partial) |" in table


def test_seeds_with_different_numbers_of_tasks_are_refused(tmp_path):
  done = _write_run(tmp_path / "done", THREE_TASKS, _config(48))
  running = _write_run(tmp_path / "running", THREE_TASKS[:2], _config(49))
  with pytest.raises(report.ReportError, match="different numbers of tasks"):
    _report(tmp_path, [done, running])


def test_tasks_flag_compares_a_long_run_with_a_short_one_on_their_first_tasks(tmp_path):
  short = _write_run(tmp_path / "short", THREE_TASKS[:2], _config(48, max_tasks=2))
  long = _write_run(tmp_path / "long", THREE_TASKS, _config(49, max_tasks=3))
  out = tmp_path / "out"
  report.build_report([short, long], str(out), tasks=2)
  summaries = json.loads((out / "report.json").read_text())
  assert list(summaries) == ["synthetic"]  # max_tasks=3 counts as 2: one group of two seeds
  assert summaries["synthetic"]["acc_mean"] == pytest.approx((0.85 + 0.80) / 2)
  with pytest.raises(report.ReportError, match="--tasks=3 but the run finished 2"):
    report.build_report([short, long], str(out), tasks=3)


def test_wrong_number_of_labels_is_refused(tmp_path):
  workdir = _write_run(tmp_path / "run", THREE_TASKS)
  with pytest.raises(report.ReportError, match="names 2 groups but the runs form 1"):
    _report(tmp_path, [workdir], labels=["a", "b"])


@pytest.mark.parametrize(
  "content, message",
  [
    ("{not json", "not a results.json written by training"),
    ('{"tasks_completed": 1}', "not a results.json written by training"),
    ('{"accuracy_matrix": [[0.9, null], [0.8]]}', "not a results.json written by training"),
    ('{"accuracy_matrix": []}', r"accuracy_matrix is not a \(tasks done, tasks\) matrix"),
    ('{"accuracy_matrix": [[0.9], [0.8]]}', r"accuracy_matrix is not a \(tasks done, tasks\)"),
  ],
)
def test_malformed_results_name_the_file(tmp_path, content, message):
  (tmp_path / "results.json").write_text(content)
  with pytest.raises(report.ReportError, match=message) as error:
    report.load_run(str(tmp_path))
  assert str(tmp_path / "results.json") in str(error.value)


def _run_cli(*args) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "mark_jax.report", *args]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_cli_missing_results_is_one_line_and_exit_code_2(tmp_path):
  finished = _write_run(tmp_path / "finished", THREE_TASKS)
  (tmp_path / "not_started").mkdir()
  result = _run_cli(finished, str(tmp_path / "not_started"))
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert str(tmp_path / "not_started" / "results.json") in result.stderr
  assert not os.path.exists(os.path.join(finished, "report.md"))


def test_cli_prints_table_and_writes_the_report(tmp_path):
  workdir = _write_run(tmp_path / "run", THREE_TASKS)
  out = tmp_path / "new" / "out"
  result = _run_cli(workdir, "--out", str(out), "--labels", "MARK")
  assert result.returncode == 0, result.stderr
  assert "| MARK | 1 (48) | 3/3 | 86.0 | -3.5 |" in result.stdout
  expected = {"accuracy_matrix.png", "accuracy_over_time.png", "report.md", "report.json"}
  assert set(os.listdir(out)) == expected
  assert not os.path.exists(os.path.join(workdir, "report.md"))


def test_groups_sharing_seeds_are_compared_with_the_baseline(tmp_path):
  frozen = [[0.90, None], [0.80, 0.70]]
  workdirs = []
  for seed, gain in ((48, 0.01), (49, 0.03), (51, 0.02)):
    workdirs.append(_write_run(tmp_path / f"f{seed}", frozen, _config(seed, meta_rounds=0)))
    mark = [[0.90, None], [0.80 + gain, 0.70]]
    workdirs.append(_write_run(tmp_path / f"m{seed}", mark, _config(seed)))
  table, markdown, summaries = _report(tmp_path, workdirs, ["frozen", "MARK"])
  paired_entry = summaries["MARK"]["paired_to_baseline"]
  assert paired_entry["baseline"] == "frozen" and paired_entry["seeds"] == [48, 49, 51]
  assert paired_entry["acc"]["mean"] == pytest.approx(0.01)  # gains / 2 tasks, mean of seeds
  assert paired_entry["acc"]["low"] < 0.01 < paired_entry["acc"]["high"]
  assert "Paired differences to frozen" in table and "| MARK | 48, 49, 51 | seed (3) |" in table
  assert "Paired differences to frozen" in markdown
  with pytest.raises(report.ReportError, match="--baseline=nope: no such group"):
    report.build_report(workdirs, str(tmp_path / "out2"), ["frozen", "MARK"], "nope")
