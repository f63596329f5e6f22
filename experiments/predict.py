r"""Classifies image files with a trained run (Keras' model.predict), or exports the run.

  python -m experiments.predict --workdir=/tmp/mnist --images='digits/*.png' [--top_k=3] \
      [--output=preds.csv|preds.json] [--weights=tested|last|best|ema]
  python -m experiments.predict --model=vgg16 --images=../shared/datasets/images/  # ImageNet
  python -m experiments.predict --workdir=/tmp/mnist --export=/tmp/mnist_export [--export_format=onnx]

--images: a file, a folder (searched recursively) or a glob. Each image is decoded,
converted and fitted to the input size as the run's data were, and the images go
through the model in batches of --batch_size over every device (one compilation). A
table (file, the top-k classes and their probabilities; a sigmoid head: its class)
is printed and, with --output, written as CSV or JSON. Unreadable files are listed
and skipped. --export writes the run's classifier (pixels to probabilities) as a
jax.export module loadable with jax alone, or with --export_format=onnx as an ONNX model
that onnxruntime runs (convjax.inference.export; needs `pip install 'convjax[onnx]'`).
"""

import csv
import json

from absl import app, flags, logging

from convjax import cli, files, inference, parallel, run
from convjax.errors import UserError

flags.DEFINE_string("workdir", None, "A trained run's workdir.")
flags.DEFINE_string("model", None, "An ImageNet model with Keras' weights instead of a run (vgg16, vgg19).")
flags.DEFINE_string("images", None, "An image file, a folder (recursively) or a glob.")
flags.DEFINE_enum("weights", "tested", run.WEIGHTS, "Which of the run's weights (see docs/using-a-run.md).")
flags.DEFINE_integer("top_k", 5, "Classes listed per image (at most the class count).")
flags.DEFINE_integer("batch_size", 64, "Images per batch (divisible by the device count).")
flags.DEFINE_string("output", None, "Write the table to this .csv or .json file.")
flags.DEFINE_string("export", None, "Write the classifier (pixels to probabilities) to this directory.")
flags.DEFINE_enum("export_format", "jax", inference.EXPORT_FORMATS, "jax: a jax.export module; onnx: an ONNX model.")


def classifier_from_flags() -> inference.Classifier:
  f = flags.FLAGS
  if bool(f.workdir) == bool(f.model):
    raise UserError("give --workdir=RUN (a trained run) or --model=vgg16 (ImageNet weights), not both")
  return inference.from_run(f.workdir, f.weights) if f.workdir else inference.pretrained(f.model)


def write_table(path: str, rows: list, skipped: list, k: int) -> None:
  """rows: (file, [(index, class, probability)]) as CSV (one line per file, skipped files with
  their reason) or JSON."""
  if not path.endswith((".csv", ".json")):
    raise UserError(f"--output={path!r}: give a .csv or .json file")
  with files.output(path, newline="") as f:
    if path.endswith(".json"):
      json.dump(
        {
          "predictions": [
            {"file": file, "top": [{"index": i, "class": c, "probability": p} for i, c, p in top]} for file, top in rows
          ],
          "skipped": [{"file": file, "reason": why} for file, why in skipped],
        },
        f,
        indent=1,
      )
      return
    writer = csv.writer(f)
    writer.writerow(["file"] + [f"{what}_{j + 1}" for j in range(k) for what in ("class", "probability")] + ["skipped"])
    for file, top in rows:
      writer.writerow([file] + [v for _, c, p in top for v in (c, f"{p:.6f}")] + [""] * 2 * (k - len(top)) + [""])
    for file, why in skipped:
      writer.writerow([file] + [""] * 2 * k + [why])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not (f.images or f.export):
    raise UserError("nothing to do: give --images=PATH to classify, --export=DIR to export, or both")
  if f.top_k < 1:
    raise UserError(f"--top_k must be >= 1, got {f.top_k}")
  files = inference.list_images(f.images) if f.images else []
  classifier = classifier_from_flags()
  if f.export:
    paths = inference.export(classifier, f.export, f.weights if f.workdir else "imagenet", f.export_format)
    logging.info("exported %s", " and ".join(paths))
  if not files:
    return
  images, read, skipped = inference.read_images(files, classifier)
  mesh = parallel.make_mesh()
  probabilities = inference.Predictor(classifier, mesh, f.batch_size)(images) if read else None
  rows = list(zip(read, inference.top_k(probabilities, classifier, f.top_k), strict=True)) if read else []
  width = max([len(p) for p in read] + [4])
  k = max([len(top) for _, top in rows] + [1])
  print(f"{'file':<{width}}  " + "  ".join(f"{'top ' + str(j + 1):<22}" for j in range(k)))
  for file, top in rows:
    print(f"{file:<{width}}  " + "  ".join(f"{c[:14]:<14} {p:7.4f}" for _, c, p in top))
  print(f"{len(read)} images classified" + (f", {len(skipped)} skipped (unreadable):" if skipped else ""))
  for file, why in skipped:
    print(f"  skipped {file}: {why}")
  if f.output:
    write_table(f.output, rows, skipped, k)
    logging.info("wrote %s", f.output)


if __name__ == "__main__":
  cli.run(main)
