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
