"""What users see: progress, metric files, evaluation of a checkpoint, seeds, ablations, --help."""

import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import ablations, cifar100
from mark_jax import config_checks, evaluate
from mark_jax.runtime import checkpointing, logs
from scripts import kb_drift

from tiny import launch_command, tiny_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _events(directory: str) -> list:
  """Every scalar (tag, step, value) in the TensorBoard event files under `directory`."""
  from tensorboardX.proto import event_pb2  # here: tensorboardX imports torch (seconds)

  scalars = []
  for name in os.listdir(directory):
    with open(os.path.join(directory, name), "rb") as f:
      content = f.read()
    offset = 0
    while offset < len(content):  # TFRecord framing: length, crc, data, crc.
      (length,) = struct.unpack("<Q", content[offset : offset + 8])
      event = event_pb2.Event.FromString(content[offset + 12 : offset + 12 + length])
      offset += 16 + length
      scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return scalars


def test_metrics_go_to_jsonl_and_tensorboard(reference):
  workdir, results = str(reference.workdir), reference.results
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  phases = {(r["task"], r["phase"]) for r in records if "epoch" in r}
  assert {(0, "feature_extractor"), (0, "kb_pretrain"), (0, "masks")} <= phases
  assert {(2, "masks"), (2, "consolidation")} <= phases
  assert any(r["phase"] == "metalearning" and "inner_loss" in r for r in records)
  last_test = [r for r in records if r["phase"] == "test"][-1]
  assert last_test["acc"] == pytest.approx(results["acc"])
  scalars = _events(os.path.join(workdir, "tensorboard"))
  tags = {tag for tag, _, _ in scalars}
  assert "task_01/masks/loss" in tags and "test/acc" in tags
  final_acc = [value for tag, step, value in scalars if tag == "test/acc" and step == 2]
  assert final_acc == [pytest.approx(results["acc"], abs=1e-6)]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["dataset"] == "synthetic"


_WRITE_WITHOUT_TORCH = """
import sys
from mark_jax.runtime import logs
writer = logs.MetricWriter({workdir!r})
writer.write("test", 0, {{"acc": 0.5}}, phase="test")
writer.close()
print(sys.modules.get("torch", "never imported"))
"""


def test_metrics_are_written_without_importing_torch(tmp_path):
  """tensorboardX imports torch whenever it is installed (only to accept its tensors): a run
  must not pay for that import, and a later `import torch` of the user must still work."""
  code = _WRITE_WITHOUT_TORCH.format(workdir=str(tmp_path))
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["never", "imported"]
  assert _events(str(tmp_path / "tensorboard")) == [("test/acc", 0, 0.5)]


_IGNORED_EXCEPTION = """
import gc
import threading
from mark_jax.runtime import errors

class Leftover:  # as a background task's coroutine, collected after its read failed
  def __del__(self):
    raise OSError("read error")

def fail():
  raise RuntimeError("Event loop is closed")

def main(argv):
  Leftover()
  gc.collect()
  thread = threading.Thread(target=fail, name="reader")
  thread.start()
  thread.join()
  print("still running")

errors.run_or_exit(main)
"""


def test_exceptions_python_ignores_are_one_line_not_a_traceback():
  """Raised in a finalizer or a background thread: logged in one line, the run goes on."""
  result = subprocess.run(
    [sys.executable, "-c", _IGNORED_EXCEPTION],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0 and result.stdout.strip() == "still running", result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  (line,) = [line for line in result.stderr.splitlines() if "read error" in line]
  assert "OSError" in line and "Leftover.__del__" in line
  (line,) = [line for line in result.stderr.splitlines() if "Event loop is closed" in line]
  assert "RuntimeError" in line and "reader" in line


def test_evaluate_reproduces_the_recorded_accuracies(reference):
  workdir, results = str(reference.workdir), reference.results
  latest = evaluate.evaluate(workdir)
  assert latest["task"] == 2
  assert latest["test_accuracy"] == pytest.approx(results["accuracy_matrix"][2], abs=1e-6)
  first = evaluate.evaluate(workdir, task=0)
  assert first["test_accuracy"] == pytest.approx([results["accuracy_matrix"][0][0]], abs=1e-6)
  assert "mean" in evaluate.format_evaluation(latest)


def test_evaluate_reads_a_workdir_from_before_todays_keys(reference, copy_workdir):
  """A config.json without any key added since the first release: evaluate fills each in as
  a resume would (of them, only feature_bn_statistics='batch' would change a test). But
  image_size: tiny_config() resizes its images, which no run of the first release did."""
  workdir = Path(copy_workdir(str(reference.workdir)))
  saved = json.loads((workdir / "config.json").read_text())
  added = set(config_checks.MISSING_KEY_VALUES) - {"image_size"}
  old = {k: v for k, v in saved.items() if k not in added}
  assert "feature_bn_statistics" in saved and "feature_bn_statistics" not in old
  (workdir / "config.json").write_text(json.dumps(old))
  latest = evaluate.evaluate(str(workdir))
  assert latest["test_accuracy"] == pytest.approx(reference.results["accuracy_matrix"][2], abs=1e-6)


def test_kb_drift_reports_how_far_metalearning_moved_the_kb(reference, capsys):
  workdir = str(reference.workdir)
  kb_drift.main([workdir])
  reported = float(capsys.readouterr().out.split()[-1])
  mngr = checkpointing.manager(os.path.join(workdir, "checkpoints"))
  first, last = kb_drift.knowledge_base_vector(mngr, 0), kb_drift.knowledge_base_vector(mngr, 2)
  assert reported == pytest.approx(np.linalg.norm(last - first) / np.linalg.norm(first), rel=0.01)
  assert 0 < reported < 1


def test_evaluate_cli_explains_a_wrong_workdir(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "mark_jax.evaluate", str(tmp_path)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
    f"error: {tmp_path}/config.json does not exist: is {tmp_path} the workdir of a run?"
  ]


def test_progress_bar_on_a_terminal(capsys):
  with logs.PhaseProgress("task 3 masks", 2, interactive=True) as bar:
    bar.update({"loss": 1.25, "accuracy": 0.5})
    bar.update({"loss": 0.75, "accuracy": 0.625})
  err = capsys.readouterr().err
  assert "task 3 masks" in err and "2/2" in err and "loss 0.7500" in err


def test_progress_log_lines_elsewhere(caplog):
  caplog.set_level(logging.INFO)
  with logs.PhaseProgress("task 3 metalearning", 4, "round", interactive=False) as bar:
    bar.update({"inner_loss": 1.5})
  lines = [r.getMessage() for r in caplog.records]
  assert any(
    line.startswith("task 3 metalearning round 1/4: inner_loss 1.5000") and "ETA" in line
    for line in lines
  )


def test_ablation_configs_differ_from_cifar100_only_where_named():
  base = cifar100.get_config().to_dict()
  for name, changes in ablations.ABLATIONS.items():
    config = ablations.get_config(name)
    assert config_checks.validate(config) == []
    changed = {k for k, v in config.to_dict().items() if base[k] != v}
    assert changed == set(changes), name
  with pytest.raises(ValueError, match="known: no_metalearning"):
    ablations.get_config("no_such_ablation")


@pytest.mark.parametrize(
  "args, expected",
  [
    (["launch.py", "--config", "configs/no_such.py"], "No such file or directory"),
    (["launch.py", "--config", "configs/smoke.py", "--config.no_such_key=1"], "no key"),
    (
      ["launch.py", "--config", "configs/smoke.py", "--config.epoch=3"],
      "error: --config.epoch=3: the config has no key 'epoch'; did you mean 'epochs'?\n",
    ),
    (["launch.py", "--config", "configs/ablations.py:no_such_name"], "known: no_metalearning"),
    (["launch.py", "--config", "configs/smoke.py", "--config.epochs=abc"], "--config.epochs=abc"),
    (["launch.py", "--config", "configs/smoke.py", "--seeds=a,b"], "not integers"),
    (
      ["launch.py", "--config", "configs/smoke.py", "--num_processes=2", "--process_id=0"],
      "error: --num_processes=2 --process_id=0: give --coordinator_address=HOST:PORT",
    ),
    (["launch.py", "--config", "configs/smoke.py", "--coordinator_address=h"], "HOST:PORT"),
    (
      ["launch.py", "--config", "configs/smoke.py", "--coordinator_address=127.0.0.1:1"],
      "give --num_processes and --process_id too",
    ),
    (
      [
        "launch.py",
        "--config",
        "configs/smoke.py",
        "--coordinator_address=127.0.0.1:1",
        "--num_processes=2",
        "--process_id=2",
      ],
      "--process_id=2: must be below --num_processes",
    ),
    (
      [
        "launch.py",
        "--config",
        "configs/smoke.py",
        "--config.distributed=True",
        "--num_processes=2",
        "--process_id=2",
      ],
      "--process_id=2: must be below --num_processes",
    ),
    (["launch.py", "--config", "configs/smoke.py", "extra"], "unexpected arguments"),
    (
      ["launch.py", "--config", "configs/smoke.py", "--config.epochs=0", "--config.batch_size=-1"],
      "--config.batch_size=-1: must be a positive integer",
    ),
    (["-m", "mark_jax.bench", "--config", "configs/nope.py"], "No such file or directory"),
    (["-m", "mark_jax.bench", "--config", "configs/smoke.py", "--config.nope=1"], "no key"),
    (["-m", "mark_jax.evaluate", "--task=x", "/tmp"], "--task"),
    (["-m", "mark_jax.report"], "give at least one WORKDIR"),
    (["-m", "mark_jax.data", "prepare", "nosuch", "--source", "/tmp"], "invalid choice"),
    (["-m", "mark_jax.data", "prepare", "miniimagenet"], "--source"),
    (["-m", "mark_jax.data", "prepare", "cifar100", "--source", "/no/such"], "no such file"),
    (["-m", "mark_jax.data"], "required: command"),
  ],
)
def test_command_line_mistakes_end_in_one_line_and_exit_2(args, expected, tmp_path):
  if args[0] == "launch.py":
    args = [*args, "--workdir", str(tmp_path / "run")]
  result = subprocess.run(
    [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  assert len(lines) == 1 and expected in result.stderr, result.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["launch.py"], ["-m", "mark_jax.evaluate"]])
def test_help_explains_the_flags(command):
  result = subprocess.run(
    [sys.executable, *command, "--helpshort"], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 1  # absl's exit status after printing help
  assert "Traceback" not in result.stderr
  flags = ("--config:", "--workdir:", "--seeds:", "--[no]allow_config_change:")
  for flag in flags if command == ["launch.py"] else ("--task:", "--data_dir:"):
    assert flag in result.stdout


def test_seeds_run_from_one_command_and_are_reported_together(reference, tmp_path):
  # tiny_config()'s programs, compiled by the reference run; one epoch per phase.
  command = launch_command(tmp_path, "--seeds=3,4", *tiny_flags(), "--config.epochs=1")
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  for seed in (3, 4):
    with open(tmp_path / f"seed_{seed}" / "results.json") as f:
      assert json.load(f)["config"]["seed"] == seed
  with open(tmp_path / "report.json") as f:
    (group,) = json.load(f).values()
  assert sorted(group["seeds"]) == [3, 4]
  assert (tmp_path / "accuracy_matrix.png").exists()
