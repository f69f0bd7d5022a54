"""MARK's data: datasets, their split into tasks, and preparing the real ones offline.

- `facts`: what is known of each dataset before loading it (classes, sizes, mean/std).
- `tasks`: splits of uint8 images, the authors' cut into tasks, stacking for evaluation.
- `datasets`: the loaders and `load_benchmark(config)`.
- `prepare`: `python -m mark_jax.data prepare DATASET --source PATH`.
- `tfds_builders`, `safe_pickle`: reading the real datasets' local files.
"""
