r"""Builds Chollet's cats_and_dogs_small layout from Kaggle's Dogs vs. Cats.

  python -m experiments.prepare_data --source=~/Downloads/train.zip \
      --output=~/data/cats_and_dogs_small

--source is Kaggle's train.zip or a folder of its extracted files (cat.0.jpg,
dog.0.jpg, ...). Each class's first 1000 files by number go to train/, the
next 500 to validation/, the next 500 to test/ (--counts), into folders named
<class>s: train/cats, train/dogs, ... An existing --output is never touched.
"""

import os
import re
import shutil
import tempfile
import zipfile

from absl import app, flags, logging

from convjax import cli, files
from convjax.errors import UserError

flags.DEFINE_string("source", None, "Kaggle's train.zip, or a folder of <class>.<n>.jpg files.")
flags.DEFINE_string("output", None, "Folder to create (must not exist).")
flags.DEFINE_list("counts", ["1000", "500", "500"], "Files per class for train, validation, test.")
flags.mark_flags_as_required(["source", "output"])

SPLITS = ("train", "validation", "test")
NAME = re.compile(r"^([A-Za-z]+)\.(\d+)\.(jpe?g|png)$", re.IGNORECASE)


def _index(names):
  """{class: [(number, name), ...] sorted by number} for names like cat.12.jpg."""
  by_class = {}
  for name in names:
    m = NAME.match(os.path.basename(name))
    if m:
      by_class.setdefault(m.group(1).lower(), []).append((int(m.group(2)), name))
  return {c: sorted(v) for c, v in by_class.items()}


def prepare(source: str, output: str, counts=(1000, 500, 500)) -> dict:
  """Writes the layout; returns {split: {class folder: count}}."""
  if os.path.exists(output):
    raise UserError(
      f"output {output!r} already exists; refusing to overwrite it (remove it or choose another --output)"
    )
  if not os.path.exists(source):
    raise UserError(f"source {source!r} does not exist")
  archive = zipfile.ZipFile(source) if zipfile.is_zipfile(source) else None
  if archive is None and not os.path.isdir(source):
    raise UserError(f"source {source!r} is neither a zip file nor a folder")
  names = archive.namelist() if archive else os.listdir(source)
  index = _index(names)
  if not index:
    raise UserError(f"source {source!r} has no files named <class>.<number>.jpg")
  need = sum(counts)
  for c, found in index.items():
    if len(found) < need:
      raise UserError(
        f"source {source!r} has {len(found)} {c} files, fewer than the {need} "
        f"that --counts={','.join(map(str, counts))} takes"
      )
  # Build beside the output and rename at the end: a failure leaves no half-made folder.
  parent = os.path.dirname(os.path.abspath(output))
  with files.writing(parent):
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".prepare_", dir=parent)
  summary = {}
  try:
    with files.writing(output):
      for c, names in sorted(index.items()):
        start = 0
        for split, n in zip(SPLITS, counts, strict=True):
          folder = os.path.join(staging, split, c + "s")
          os.makedirs(folder)
          for _, name in names[start : start + n]:
            target = os.path.join(folder, os.path.basename(name))
            if archive:
              with archive.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            else:
              shutil.copyfile(os.path.join(source, name), target)
          summary.setdefault(split, {})[c + "s"] = n
          start += n
      os.rename(staging, output)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  finally:
    if archive:
      archive.close()
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    counts = tuple(int(c) for c in flags.FLAGS.counts)
  except ValueError:
    raise UserError(f"--counts must be integers, got {flags.FLAGS.counts}") from None
  if len(counts) != 3 or min(counts) <= 0:
    raise UserError(f"--counts needs three positive numbers (train, validation, test), got {counts}")
  summary = prepare(os.path.expanduser(flags.FLAGS.source), os.path.expanduser(flags.FLAGS.output), counts)
  logging.info("wrote %s: %s", flags.FLAGS.output, summary)


if __name__ == "__main__":
  cli.run(main)
