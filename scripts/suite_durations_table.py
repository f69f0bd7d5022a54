"""Compares two pytest `--durations=0` outputs: every test over a threshold before.

  python scripts/suite_durations_table.py BEFORE.log AFTER.log [--over 10]

Prints a markdown table of each test (setup + call + teardown) that took more than `--over`
seconds in BEFORE, with its time in AFTER ("gone" if AFTER does not have it).
"""

import argparse
import collections
import re

LINE = re.compile(r"^([0-9.]+)s (setup|call|teardown)\s+(\S.*)$")


def read_durations(path: str) -> dict[str, float]:
  """Test id -> its seconds (setup, call and teardown summed)."""
  seconds = collections.defaultdict(float)
  with open(path) as f:
    for line in f:
      match = LINE.match(line.strip())
      if match:
        seconds[match.group(3)] += float(match.group(1))
  return dict(seconds)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("before")
  parser.add_argument("after")
  parser.add_argument("--over", type=float, default=10.0)
  args = parser.parse_args()
  before, after = read_durations(args.before), read_durations(args.after)
  print("| before (s) | after (s) | test |\n|---:|---:|---|")
  for test, seconds in sorted(before.items(), key=lambda item: -item[1]):
    if seconds > args.over:
      now = f"{after[test]:.1f}" if test in after else "gone"
      print(f"| {seconds:.1f} | {now} | `{test}` |")


if __name__ == "__main__":
  main()
