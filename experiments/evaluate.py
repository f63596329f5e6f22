r"""Evaluates a trained run on one of its splits (Keras' model.evaluate, with a breakdown).

  python -m experiments.evaluate --workdir=/tmp/mnist [--split=test] [--weights=tested]

Prints and writes to <workdir>/eval/<split>/: metrics.json (loss, accuracy, top-5
accuracy where there are more than 5 classes, per-class precision/recall/support, the
confusion matrix), predictions.csv (each row's label, prediction and probability),
confusion_matrix.png (with class names) and misclassified.png (the most confidently
wrong examples with their true and predicted labels). The split is read as the run
read it and evaluated in its eval batches with the weights --weights names
(default: those its test used, so the accuracy is history.json's test_accuracy).
"""

import csv
import os

import numpy as np
from absl import app, flags, logging

from convjax import cli, files, inference, parallel, run
from convjax.data.splits import open_source
from convjax.errors import UserError
from convjax.viz import plots

flags.DEFINE_string("workdir", None, "A trained run's workdir.")
flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Which of the run's splits.")
flags.DEFINE_enum("weights", "tested", run.WEIGHTS, "Which of the run's weights (see docs/using-a-run.md).")
flags.DEFINE_integer("num_wrong", 16, "Misclassified examples shown (the most confident first).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  config = run.read_config(f.workdir)
  classifier = inference.from_run(f.workdir, f.weights)
  source = open_source(config.data)
  splits = source.splits(stream=source.streams)  # streamed: only the split asked for is read
  if f.split not in splits:
    raise UserError(f"--split={f.split}: the run has splits {', '.join(splits)}")
  split = splits[f.split]
  mesh = parallel.make_mesh(config.num_devices or None)
  predictor = inference.Predictor(classifier, mesh, config.eval_batch_size or config.batch_size)
  logging.info("evaluating %s: %s (%d rows)", f.split, split.spec, split.size)
  result = inference.evaluate_split(split, predictor, f.num_wrong)
  classes = classifier.classes
  scores = inference.metrics(result, classes)
  out = os.path.join(f.workdir, "eval", f.split)
  files.make_dir(out)
  files.write_json(os.path.join(out, "metrics.json"), {"split": split.spec, "weights": f.weights, **scores})
  path = os.path.join(out, "predictions.csv")
  with files.output(path, newline="") as fh:
    writer = csv.writer(fh)
    writer.writerow(["row", "label", "predicted", "probability", "correct"])
    for i, (label, predicted) in enumerate(zip(result.labels, result.predicted, strict=True)):
      writer.writerow(
        [i, classes[label], classes[predicted], f"{result.probabilities[i, predicted]:.6f}", int(label == predicted)]
      )
  plots.confusion_matrix(
    np.asarray(scores["confusion_matrix"]),
    classes,
    os.path.join(out, "confusion_matrix.png"),
    f"{f.split}: accuracy {scores['accuracy']:.4f} ({scores['count']:,} images)",
  )
  if result.wrong:
    plots.image_grid(
      [image for _, _, image in result.wrong],
      os.path.join(out, "misclassified.png"),
      cols=min(4, len(result.wrong)),
      titles=[
        f"row {row}: true {classes[result.labels[row]]}\npredicted {classes[result.predicted[row]]} ({p:.3f})"
        for p, row, _ in result.wrong
      ],
    )
  print(
    f"{f.split} ({scores['count']:,} images): loss {scores['loss']:.4f}  accuracy {scores['accuracy']:.4f}"
    + (f"  top-5 {scores['top5_accuracy']:.4f}" if "top5_accuracy" in scores else "")
  )
  width = max(len(c) for c in classes[:200]) if classes else 5
  print(f"{'class':<{width}}  precision  recall  support")
  for name, row in list(scores["per_class"].items())[:200]:
    print(f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['support']:7d}")
  logging.info("wrote %s", out)


if __name__ == "__main__":
  cli.run(main)
