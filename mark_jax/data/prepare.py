"""`python -m mark_jax.data prepare DATASET --source PATH`: the real datasets, offline.

Builds the TFDS dataset (array_record) that training reads from a local copy of
CIFAR-100, MiniImageNet or ImageNet (mark_jax.data.tfds_builders).
"""

import argparse
import os
import tempfile

from etils import epath

from mark_jax.runtime.errors import DataError

# Local copies that `prepare` turns into TFDS datasets: our name -> builder class in
# mark_jax.data.tfds_builders (imported only when preparing: it loads tensorflow_datasets).
PREPARABLE = {
  "cifar100": "MarkCifar100",
  "imagenet": "MarkImagenet",
  "miniimagenet": "MarkMiniimagenet",
}


def prepare(dataset: str, source: str, data_dir: str | None, verify_md5: bool = True) -> str:
  """Builds the TFDS dataset (array_record) of `dataset` from a local copy.

  Args:
    dataset: 'cifar100', 'miniimagenet' or 'imagenet'.
    source: cifar100: the official cifar-100-python.tar.gz or its extracted folder;
      miniimagenet, imagenet: a folder in a layout of mark_jax.data.tfds_builders.
    data_dir: TFDS data_dir to write to (None: TFDS's default).
    verify_md5: check CIFAR-100's official md5 sums (switch off only for test archives).

  Returns:
    The directory of the prepared dataset.

  Raises:
    DataError: the source is missing, incomplete, altered or unreadable.
  """
  import tensorflow_datasets as tfds  # Imported lazily: heavy, only preparing needs it here.

  from mark_jax.data import tfds_builders

  builder_class = getattr(tfds_builders, PREPARABLE[dataset])
  source_path = os.path.abspath(source)
  if not os.path.exists(source_path):
    raise DataError(f"{source}: no such file or directory")
  if os.path.isdir(source_path) and not os.listdir(source_path):
    raise DataError(f"{source}: an empty folder")
  builder = builder_class(
    data_dir=data_dir or None, file_format="array_record", verify_md5=verify_md5
  )
  if (epath.Path(builder.data_dir) / "dataset_info.json").exists():
    raise DataError(
      f"{dataset} is already prepared in {builder.data_dir}; to prepare it again from "
      f"{source}, move that directory away first"
    )
  with tempfile.TemporaryDirectory() as tmp:
    manual_dir, link = source_path, os.path.join(tmp, tfds_builders.CIFAR100_ARCHIVE)
    if os.path.isfile(source_path):
      if dataset != "cifar100":
        raise DataError(f"{source}: give the folder that holds {dataset}, not a file")
      manual_dir = tmp
      os.symlink(source_path, link)
    elif dataset == "cifar100" and tfds_builders.find_cifar100(epath.Path(source_path)) is None:
      raise DataError(
        f"{source}: holds neither {tfds_builders.CIFAR100_ARCHIVE} nor "
        f"{tfds_builders.CIFAR100_FOLDER}/ (train, test, meta)"
      )
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
      builder.download_and_prepare(download_config=download_config)
    except DataError as error:  # Name the user's archive, not the temporary link to it.
      raise DataError(str(error).replace(link, source_path)) from None
  return str(builder.data_dir)


class _OneLineParser(argparse.ArgumentParser):
  """argparse that reports a command-line mistake as one line and exits with status 2."""

  def error(self, message: str):
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> None:
  """`python -m mark_jax.data prepare DATASET --source PATH [--data_dir DIR]`."""
  parser = _OneLineParser(
    prog="python -m mark_jax.data", description="Prepare MARK's datasets for offline use."
  )
  commands = parser.add_subparsers(dest="command", required=True)
  prepare_parser = commands.add_parser(
    "prepare",
    help="build a TFDS dataset (array_record) from a local copy",
    description="Builds the TFDS dataset that training reads from a local copy.",
  )
  prepare_parser.add_argument("dataset", choices=sorted(PREPARABLE))
  prepare_parser.add_argument(
    "--source",
    required=True,
    help="cifar100: cifar-100-python.tar.gz or its extracted folder; miniimagenet: a folder "
    "with train/<wnid>/*.jpg + val/<wnid>/*.jpg, train.pkl + test.pkl, or "
    "mini-imagenet-cache-{train,val,test}.pkl; imagenet: a folder with train/<wnid>/ + "
    "val/<wnid>/ (ILSVRC2012, validation regrouped by class)",
  )
  prepare_parser.add_argument(
    "--data_dir", default=None, help="TFDS data_dir (default: TFDS's, ~/tensorflow_datasets)"
  )
  prepare_parser.add_argument(
    "--noverify_md5",
    dest="verify_md5",
    action="store_false",
    help="skip the check of CIFAR-100's official md5 sums (only for test archives)",
  )
  args = parser.parse_args(argv)
  try:
    path = prepare(args.dataset, args.source, args.data_dir, args.verify_md5)
  except DataError as error:  # the source given cannot be prepared: the user's to fix
    parser.exit(2, f"error: {error}\n")
  hint = f" (train with --config.data_dir={args.data_dir})" if args.data_dir else ""
  print(f"{args.dataset} is ready in {path}{hint}")


if __name__ == "__main__":
  main()
