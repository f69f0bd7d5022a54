r"""Benchmark of MARK's compiled phases on synthetic data at a config's real shapes.

  python -m mark_jax.bench --config configs/cifar100.py
  python -m mark_jax.bench --config configs/cifar100.py --config.epochs=2 \
      --config.meta_rounds=1 --json /tmp/bench.json

Reports, with compilation timed apart: each phase's step time and examples/s, one
metalearning round, seconds per task (measured on task 1, after task 0 compiled
everything, unless --notime_task), peak memory, and achieved FLOP/s against the model's
FLOPs (XLA's count of one step with native convolutions, compiled for the host CPU: the
work the math needs, the same on every device).
"""

import collections
import contextlib
import functools
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mark_jax import mark, metalearning, op_profile, state, train
from mark_jax import phases as phases_lib
from mark_jax import programs as programs_lib
from mark_jax.data import datasets, facts
from mark_jax.data.tasks import TaskData
from mark_jax.models import Networks, normalize
from mark_jax.runtime import devices, errors, logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_JSON = flags.DEFINE_string("json", "bench.json", "Where to write the results as JSON.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs of each compiled epoch and round.")
_TIME_TASK = flags.DEFINE_bool("time_task", True, "Run tasks 0 and 1 and time task 1 whole.")
_PROFILE_DIR = flags.DEFINE_string(
  "profile_dir", "", "Also trace one metalearning round here and list its slowest ops."
)
flags.mark_flags_as_required(["config"])

PHASES = ("feature_extractor", "kb_pretrain", "masks", "kb_sgd")


def synthetic_config(config):
  """The config on synthetic data of its dataset's shape, 2 tasks: 500 train/100 test images
  per class of a real dataset's size, or a synthetic config's own sizes."""
  config = config.copy_and_resolve_references()
  config.max_tasks = 0
  config.synthetic.num_classes = 2 * config.classes_per_task
  if config.dataset != "synthetic":
    known = facts.FACTS.get(config.dataset)
    size = known.image_size if known else config.synthetic.image_size
    config.dataset = "synthetic"
    config.synthetic.update(train_per_class=500, test_per_class=100, image_size=size)
  return config


def _time(fn, args, repeats: int):
  """Runs fn(*args) `repeats` times, threading the donated first argument.

  Returns:
    (seconds of each run, the arguments for a next run).
  """
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    seconds.append(time.perf_counter() - start)
    args = (out[0], *args[1:])
  return seconds, args


def _compile(jitted, args):
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _flops(fn, *args) -> float:
  """XLA's FLOP count of fn(*args), compiled for the host CPU.

  GPU backends leave library calls (cuDNN convolutions) out of their count, so the count
  is taken where every convolution is an XLA op: the same model FLOPs on every device.
  """
  cpu_args = jax.device_put(args, jax.devices("cpu")[0])
  return float(jax.jit(fn).lower(*cpu_args).compile().cost_analysis()["flops"])


def _batch(task: TaskData, batch_size: int) -> dict:
  return {
    "image": jnp.asarray(task.train.images[:batch_size]),
    "label": jnp.asarray(task.train.labels[:batch_size]),
    "weight": jnp.ones(batch_size, jnp.float32),
  }


def run(config, repeats: int, time_task: bool, profile_dir: str = "") -> dict:
  """Measures everything the module docstring lists; returns a JSON-ready dict.

  With `profile_dir`, one more metalearning round runs under jax.profiler (traced there)
  and `meta_round_profile` lists its ops by time (mark_jax.op_profile).
  """
  if config.feature_extractor != "cnn":
    raise errors.ConfigError(
      "the benchmark times the phases of F^t's CNN: run it with --config.feature_extractor=cnn"
    )
  config = synthetic_config(config)
  benchmark = datasets.load_benchmark(config)
  programs = programs_lib.build_programs(config, benchmark)
  native_config = config.copy_and_resolve_references()
  native_config.conv_impl = "native"
  # The model's FLOPs are counted on the networks with native convolutions.
  native_nets = Networks(native_config, benchmark.image_size, benchmark.classes_per_task)
  native_phases = phases_lib.make_phases(native_nets, native_config, benchmark.mean, benchmark.std)
  run_state = state.initial(programs.nets, config.seed, len(benchmark.tasks), programs.mesh)
  task = benchmark.tasks[1]
  data = programs_lib.device_data(config, programs.mesh, task)
  model = {
    **state.task_slot(run_state["tasks"], 1),
    "knowledge_base": run_state["knowledge_base"],
  }
  num_train, batch = len(task.train), _batch(task, config.batch_size)
  steps_per_epoch = -(-num_train // config.batch_size)
  rng = jax.random.PRNGKey(0)
  results = {
    "device": str(jax.devices()[0]),
    "backend": jax.default_backend(),
    "conv_impl": programs.nets.knowledge_base.conv_impl,
    "train_examples_per_task": num_train,
    "batch_size": config.batch_size,
    "phases": {},
  }

  # The phases after F^t's read its features as a run hands them (mark.with_task_features).
  later_data = mark.with_task_features(programs, config, model, data)
  later_inputs = later_data["train_image"]
  later_batch = {**batch, "image": jax.tree.map(lambda a: a[: config.batch_size], later_inputs)}
  for name in PHASES:
    phase = programs.phases[name]
    if name == "feature_extractor":
      params, frozen, model_state = mark.feature_phase_inputs(programs, model, rng)
      inputs, step_batch = data["train_image"], batch
    else:
      params, frozen, model_state = mark.phase_inputs(phase, model)
      inputs, step_batch = later_inputs, later_batch
    # Built and placed as a run builds and places them: the very programs a run compiles.
    # Copied: the epoch donates its state, and `params` serve the phases after this one.
    donated = jax.tree.map(jnp.copy, programs.init_phase_states[name](params, model_state))
    frozen, epoch_rng = devices.replicate((frozen, rng), programs.mesh)
    args = (donated, frozen, inputs, data["train_label"], epoch_rng)
    compiled, compile_s = _compile(programs.epoch_fns[name], args)
    args = (compiled(*args)[0], *args[1:])
    epoch_s = float(np.median(_time(compiled, args, repeats)[0]))
    step = functools.partial(phases_lib.train_step, native_phases[name])
    state_0 = phases_lib.init_state(phase, params, model_state)
    flops = _flops(step, frozen, state_0, step_batch, rng)
    step_s = epoch_s / steps_per_epoch
    results["phases"][name] = {
      "compile_s": compile_s,
      "epoch_s": epoch_s,
      "steps_per_epoch": steps_per_epoch,
      "step_ms": 1e3 * step_s,
      "examples_per_s": num_train / epoch_s,
      "model_gflop_per_step": flops / 1e9,
      "achieved_gflop_per_s": flops / step_s / 1e9,
    }

  task_vars = {k: v for k, v in model.items() if k != "knowledge_base"}
  kb = jax.tree.map(jnp.copy, run_state["knowledge_base"])
  kb, task_vars, round_rng = devices.replicate((kb, task_vars, rng), programs.mesh)
  args = (kb, task_vars, later_inputs, data["train_label"], round_rng)
  compiled, compile_s = _compile(programs.meta_round, args)
  round_seconds, args = _time(compiled, args, repeats)
  round_s = float(np.median(round_seconds))
  if profile_dir:
    _, results["meta_round_profile"] = op_profile.profile(compiled, args, profile_dir)
  init_inner, inner_step = metalearning.make_inner_step(
    native_nets, config, metalearning.round_settings(config)
  )
  params = {"knowledge_base": run_state["knowledge_base"], "head": model["head"]}
  images = normalize(batch["image"], benchmark.mean, benchmark.std)
  masks = native_nets.masks(model, images, config.use_masks)
  inner_flops = _flops(inner_step, params, init_inner(params), images, batch["label"], masks, rng)
  round_flops = inner_flops * config.mini_tasks * config.inner_steps
  results["meta_round"] = {
    "compile_s": compile_s,
    "round_s": round_s,
    "mini_tasks": config.mini_tasks,
    "inner_steps": config.inner_steps,
    "mini_task_step_ms": 1e3 * round_s / (config.mini_tasks * config.inner_steps),
    "model_gflop_per_round": round_flops / 1e9,
    "achieved_gflop_per_s": round_flops / round_s / 1e9,
  }

  phases = results["phases"]
  epoch_s = {name: phases[name]["epoch_s"] for name in PHASES}
  results["estimated_seconds_per_task"] = per_task(config, epoch_s, round_s)
  epoch_gflop = {name: phases[name]["model_gflop_per_step"] * steps_per_epoch for name in PHASES}
  results["model_gflop_per_task"] = per_task(config, epoch_gflop, round_flops / 1e9)
  pretrain_gflop = config.epochs * epoch_gflop["kb_pretrain"] if config.pretrain_kb else 0.0
  results["model_gflop_kb_pretrain"] = pretrain_gflop  # task 0 only
  if time_task:
    task = _time_one_task(config)
    results["seconds_per_task"] = task["seconds"]
    results["task_parts_s"], results["task_unnamed_s"] = task["parts"], task["unnamed_s"]
  results["peak_memory_bytes"], results["peak_memory_kind"] = devices.peak_memory()
  results["config"] = config.to_dict()
  return results


def per_task(config, per_epoch: dict, per_round: float) -> float:
  """A quantity (seconds, GFLOP) of one task after the first, from its phases' values.

  Args:
    config: the run config (epochs, meta_rounds, use_metalearning).
    per_epoch: the quantity for one epoch of each of PHASES.
    per_round: the quantity for one metalearning round.

  Returns:
    F^t epochs, masks and consolidation epochs, then the KB update (metalearning rounds,
    or epochs of plain SGD). Task 0 adds the KB pretraining epochs.
  """
  kb_update = (
    config.meta_rounds * per_round
    if config.use_metalearning
    else config.epochs * per_epoch["kb_sgd"]
  )
  return config.epochs * (per_epoch["feature_extractor"] + 2 * per_epoch["masks"]) + kb_update


class PartTimer:
  """mark.Run's timer: records when each part of a task ran, as (part, start, end)."""

  def __init__(self):
    self.intervals = []

  @contextlib.contextmanager
  def __call__(self, part: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.intervals.append((part, start, time.perf_counter()))

  def last_task(self) -> tuple[float, dict[str, float]]:
    """(seconds of the last task, seconds of each of its parts by name)."""
    _, start, end = [i for i in self.intervals if i[0] == "task"][-1]
    parts = collections.defaultdict(float)
    for part, begin, finish in self.intervals:
      if part != "task" and start <= begin and finish <= end:
        parts[part] += finish - begin
    return end - start, dict(parts)


def _time_one_task(config) -> dict:
  """Task 1 of a run as launch.py trains it (five steps, evaluation, checkpoint, results),
  after task 0 compiled everything: its seconds, those of each part, and the rest."""
  config = config.copy_and_resolve_references()
  config.max_tasks = 2
  timer = PartTimer()
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir, timer=timer)
  seconds, parts = timer.last_task()
  return {"seconds": seconds, "parts": parts, "unnamed_s": seconds - sum(parts.values())}


def format_table(results: dict) -> str:
  lines = [
    f"device {results['device']} ({results['conv_impl']} convolutions), "
    f"{results['train_examples_per_task']} training images per task, "
    f"batch {results['batch_size']}",
    f"{'phase':<18}{'compile s':>10}{'step ms':>10}{'examples/s':>12}"
    f"{'GFLOP/step':>12}{'GFLOP/s':>10}",
  ]
  for name, r in results["phases"].items():
    lines.append(
      f"{name:<18}{r['compile_s']:>10.1f}{r['step_ms']:>10.1f}{r['examples_per_s']:>12.0f}"
      f"{r['model_gflop_per_step']:>12.2f}{r['achieved_gflop_per_s']:>10.1f}"
    )
  m = results["meta_round"]
  lines.append(
    f"meta round: {m['round_s']:.2f} s ({m['mini_tasks']} mini-tasks x {m['inner_steps']} "
    f"steps, {m['mini_task_step_ms']:.1f} ms per mini-task step, compile {m['compile_s']:.1f} s, "
    f"{m['achieved_gflop_per_s']:.1f} GFLOP/s)"
  )
  if "meta_round_profile" in results:
    lines.extend(format_profile(results["meta_round_profile"]))
  if "seconds_per_task" in results:
    lines.append(f"seconds per task (task 1, measured): {results['seconds_per_task']:.1f}")
    for part, seconds in sorted(results["task_parts_s"].items(), key=lambda item: -item[1]):
      lines.append(f"  {part:<34}{seconds:>8.2f} s")
    lines.append(f"  {'named by no part':<34}{results['task_unnamed_s']:>8.2f} s")
  lines.append(
    f"seconds per task (task > 0, from the parts above): "
    f"{results['estimated_seconds_per_task']:.1f}"
  )
  lines.append(
    f"peak memory: {results['peak_memory_bytes'] / 2**30:.2f} GiB ({results['peak_memory_kind']})"
  )
  return "\n".join(lines)


def format_profile(profile: dict, rows: int = 20) -> list[str]:
  """The slowest ops of a traced round: seconds over all devices, shape, JAX source."""
  lines = [
    f"traced meta round: {profile['seconds']:.2f} s; its slowest ops, seconds summed over "
    f"devices ({sum(op['seconds'] for op in profile['ops']):.2f} s in all named ops):"
  ]
  for op in profile["ops"][:rows]:
    source = op["source"].split("/while/body/")[-1]
    lines.append(f"  {op['seconds']:>7.2f} s  {op['name']:<26}{op['shape']:<34}{source}")
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logs.quiet_logs(keep_own_info=False)
  devices.set_cpu_devices(_CONFIG.value.cpu_devices)
  results = run(_CONFIG.value, _REPEATS.value, _TIME_TASK.value, _PROFILE_DIR.value)
  print(format_table(results))
  with open(_JSON.value, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  errors.run_or_exit(main, _CONFIG)
