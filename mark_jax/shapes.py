"""The networks' shape rule: kernel sides from the image size, and the smallest image the
networks take. Read by mark_jax.models and mark_jax.config_checks; standard library only.
"""

CONV_IMPLS = ("native", "patches", "winograd")


def kernel_sizes(image_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Kernel sides of the KB's and F^t's convolutions, as the authors size them.

  Returns:
    (KB: image_size // 8, image_size // 10, 2; F^t: image_size // 8, image_size // 10).
  """
  first, second = image_size // 8, image_size // 10
  return (first, second, 2), (first, second)


def network_fits(image_size: int) -> bool:
  """Whether every spatial size of the KB and the feature extractor stays >= 1.

  Each VALID conv (sides from `kernel_sizes`) is followed by a 2x2 max-pool that drops odd
  edges.
  """
  for sizes in kernel_sizes(image_size):
    side = image_size
    for kernel in sizes:
      if kernel < 1:
        return False
      side = (side - kernel + 1) // 2
      if side < 1:
        return False
  return True


def smallest_image_size(largest: int = 1024) -> int:
  """The smallest size from which every square image size up to `largest` fits the network."""
  size = largest
  while size > 1 and network_fits(size - 1):
    size -= 1
  return size


MIN_IMAGE_SIZE = smallest_image_size()
