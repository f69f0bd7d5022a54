"""README's first command, to the end: the out-of-the-box run must never diverge silently."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_first_command_finishes_with_high_accuracy(tmp_path):
  workdir = tmp_path / "mark_digits"
  command = [sys.executable, "launch.py", "--config", "configs/digits.py", "--workdir", workdir]
  proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["config"]["seed"] == 48
  assert results["tasks_completed"] == 5
  assert results["acc"] >= 0.95, results["final_accuracies"]
