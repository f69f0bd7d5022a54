"""The smallest useful MARK config, for tests."""


def tiny_config(**overrides):
  """configs/smoke.py shrunk further: 3 synthetic tasks, 2 epochs, tiny meta round."""
  from configs import smoke

  config = smoke.get_config()
  config.synthetic.train_per_class = 16
  config.synthetic.test_per_class = 8
  config.batch_size = 16
  config.eval_batch_size = 40
  config.epochs = 2
  config.mini_tasks = 3
  config.inner_steps = 3
  config.cpu_devices = 0  # one device, like the test process: launches match in-process runs
  for key, value in overrides.items():
    config[key] = value
  return config


def fresh_run(config):
  """(benchmark, run, run_state) of `config` before task 0, built in this process."""
  from mark_jax import mark, state
  from mark_jax import programs as programs_lib
  from mark_jax.data import datasets

  benchmark = datasets.load_benchmark(config)
  programs = programs_lib.build_programs(config, benchmark)
  run_state = state.initial(programs.nets, config.seed, len(benchmark.tasks), programs.mesh)
  return benchmark, mark.Run(config, programs), run_state


def task_model(run_state, t: int) -> dict:
  """A copy of task t's F/M/C with the KB (phases donate what they train)."""
  import jax

  from mark_jax import state

  model = {**state.task_slot(run_state["tasks"], t), "knowledge_base": run_state["knowledge_base"]}
  return jax.tree.map(lambda a: a.copy(), model)


def abstract_state(config):
  """The shapes of a run state of `config` (what a checkpoint restore needs)."""
  from mark_jax import programs as programs_lib
  from mark_jax import state
  from mark_jax.data import datasets
  from mark_jax.models import Networks

  benchmark = datasets.load_benchmark(config)
  nets = Networks(config, benchmark.image_size, benchmark.classes_per_task)
  return state.abstract(nets, config.seed, len(benchmark.tasks), programs_lib.make_mesh(config))
