"""The benchmark script (`python -m mark_jax.bench`) on a tiny network: a smoke test."""

import json
import os

from mark_jax import bench, shapes
from tests.tiny import tiny_config


def kb_forward_conv_flops(image_size: int, channels, kernel_sizes) -> int:
  """Multiply-adds x 2 of the KB's convolutions for one image (VALID convs, 2x2 pools)."""
  size, in_channels, flops = image_size, 3, 0
  for out_channels, kernel in zip(channels, kernel_sizes, strict=True):
    out = size - kernel + 1
    flops += 2 * out * out * kernel * kernel * in_channels * out_channels
    size, in_channels = out // 2, out_channels
  return flops


def test_bench_reports_every_phase_and_counts_the_convolutions(tmp_path):
  # tiny_config()'s own synthetic sizes: its epochs and round are the reference's programs.
  config = tiny_config()
  results = bench.run(config, repeats=1, time_task=True, profile_dir=str(tmp_path / "trace"))
  json.dumps(results)  # JSON-ready, as main() writes it

  assert results["train_examples_per_task"] < 5 * config.synthetic.train_per_class
  assert set(results["phases"]) == set(bench.PHASES)
  for name, phase in results["phases"].items():
    assert phase["step_ms"] > 0 and phase["examples_per_s"] > 0, name
    assert phase["achieved_gflop_per_s"] > 0, name
  # A KB step does the forward convolutions and, for every kernel, a weight gradient of the
  # same cost (and most input gradients): 2x to 5x the forward count with the dense layers.
  # A count that leaves convolutions out (as GPU backends' does) falls far short.
  kb_kernels, _ = shapes.kernel_sizes(config.image_size)
  forward = config.batch_size * kb_forward_conv_flops(
    config.image_size, config.kb_channels, kb_kernels
  )
  kb_step = 1e9 * results["phases"]["kb_pretrain"]["model_gflop_per_step"]
  assert 2 * forward <= kb_step <= 5 * forward, (kb_step, forward)
  meta = results["meta_round"]
  assert meta["mini_tasks"] == config.mini_tasks and meta["round_s"] > 0
  assert results["estimated_seconds_per_task"] > 0
  assert results["model_gflop_per_task"] > 0 and results["model_gflop_kb_pretrain"] > 0
  assert results["peak_memory_bytes"] > 0
  assert "meta round" in bench.format_table(results)
  # The traced round's ops: its instructions by time, each with the JAX op it came from.
  profile = results["meta_round_profile"]
  ops = profile["ops"]
  assert [op["seconds"] for op in ops] == sorted((op["seconds"] for op in ops), reverse=True)
  named = sum(op["seconds"] for op in ops)
  assert 0.2 * profile["seconds"] < named <= os.cpu_count() * profile["seconds"]
  assert any("KnowledgeBase)/Conv_1/" in op["source"] for op in ops)
  assert "traced meta round" in bench.format_table(results)
  # Task 1 as launch.py trains it, every second named by a part but the loop's own.
  parts = results["task_parts_s"]
  for step in ("masks", "consolidation"):
    assert parts[f"{step} epochs"] > 0 and parts[f"{step} validation"] > 0, step
  for part in (
    "feature_extractor epochs",
    "feature statistics",
    "metalearning rounds",
    "task data to the devices",
    "evaluation of the seen tasks",
    "checkpoint",
    "results and metrics",
  ):
    assert parts[part] > 0, part
  assert "kb_pretrain epochs" not in parts  # task 0 only
  assert 0 <= results["task_unnamed_s"] < 0.1 * results["seconds_per_task"]
