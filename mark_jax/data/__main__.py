"""`python -m mark_jax.data prepare DATASET --source PATH [--data_dir DIR]`."""

from mark_jax.data import prepare

if __name__ == "__main__":
  prepare.main()
