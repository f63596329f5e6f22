r"""Convnet vs classic machine learning on one split, as the notes compare them.

  python -m experiments.baselines --config=configs/sign_language.py --workdir=/tmp/sign_baselines

Trains the config's CNN (in <workdir>/cnn) and the notes' MLP (<workdir>/mlp)
with experiments.train's loop, and SVM (RBF), kNN (k=3), logistic regression
and a random forest (100 trees) with scikit-learn on the same images: the
classic models fit on train + validation (flattened pixels in [0, 1]) and all
are scored on the same test images. Writes baselines.json, baselines.md (a
table) and baselines.png (a bar chart). Re-running resumes or reuses the runs.
"""

import os
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from convjax import cli, files
from convjax import config as config_lib
from convjax.data.splits import open_source
from convjax.train.loop import train_and_evaluate
from convjax.viz.plots import bar_chart

config_flags.DEFINE_config_file("config", None, "The CNN's experiment config (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for the runs and the comparison.")
flags.DEFINE_integer("mlp_epochs", 50, "Epochs for the MLP (the notes: 50).")
flags.mark_flags_as_required(["config", "workdir"])


def classic_models(seed: int = 0) -> dict:
  from sklearn.ensemble import RandomForestClassifier
  from sklearn.linear_model import LogisticRegression
  from sklearn.neighbors import KNeighborsClassifier
  from sklearn.svm import SVC

  return {
    "SVM (RBF)": SVC(gamma="scale", decision_function_shape="ovo"),
    "kNN (k=3)": KNeighborsClassifier(n_neighbors=3),
    "Logistic regression": LogisticRegression(solver="lbfgs", max_iter=1000, random_state=seed),
    "Random forest (100 trees)": RandomForestClassifier(n_estimators=100, random_state=seed),
  }


def flat_arrays(split, rescale: float):
  rows = split.read(0, split.size)
  x = rows["image"].reshape(split.size, -1).astype(np.float32) * rescale
  return x, rows["label"]


def compare(config, workdir: str, mlp_epochs: int) -> list:
  """[{'method', 'test_accuracy', 'seconds'}] for every method, CNN last."""
  splits = open_source(config.data).splits()
  if "test" not in splits:
    raise ValueError("the config has no test split to compare on")
  rescale = config.data.rescale
  x_train, y_train = map(
    np.concatenate, zip(flat_arrays(splits["train"], rescale), flat_arrays(splits["validation"], rescale), strict=True)
  )
  x_test, y_test = flat_arrays(splits["test"], rescale)
  logging.info("classic models: %d train, %d test, %d features", *x_train.shape[:1], len(y_test), x_train.shape[1])
  results = []
  for name, model in classic_models(config.seed).items():
    t0 = time.perf_counter()
    model.fit(x_train, y_train)
    accuracy = float(np.mean(model.predict(x_test) == y_test))
    results.append({"method": name, "test_accuracy": accuracy, "seconds": time.perf_counter() - t0})
    logging.info("%s: test accuracy %.4f (%.1fs)", name, accuracy, results[-1]["seconds"])

  mlp = config_lib.copy_config(config)
  mlp.model, mlp.model_kwargs = "notes_mlp", {"num_classes": config.model_kwargs.get("num_classes", 10)}
  mlp.num_epochs, mlp.learning_rate = mlp_epochs, 1e-3
  mlp.augment = config_lib.default_config().augment
  for name, run_config in (("MLP (512-512, dropout 0.2)", mlp), (f"CNN ({config.model})", config)):
    t0 = time.perf_counter()
    subdir = "mlp" if run_config is mlp else "cnn"
    history = train_and_evaluate(run_config, os.path.join(workdir, subdir))
    results.append(
      {
        "method": name,
        "test_accuracy": history[-1]["test_accuracy"],
        "seconds": time.perf_counter() - t0,
        "epochs": len(history) - 1,
      }
    )
  return results


def write_report(results: list, workdir: str, title: str) -> None:
  files.write_json(os.path.join(workdir, "baselines.json"), results)
  lines = ["| method | test accuracy | seconds |", "|---|---|---|"]
  lines += [f"| {r['method']} | {r['test_accuracy']:.4f} | {r['seconds']:.1f} |" for r in results]
  files.write_text(os.path.join(workdir, "baselines.md"), "\n".join(lines) + "\n")
  bar_chart(
    [r["method"] for r in results],
    [r["test_accuracy"] for r in results],
    os.path.join(workdir, "baselines.png"),
    ylabel="test accuracy",
    title=title,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  config_lib.validate(config)
  files.make_dir(workdir)
  results = compare(config, workdir, flags.FLAGS.mlp_epochs)
  write_report(results, workdir, title=os.path.basename(config.data.folder or config.data.dataset))
  for r in results:
    logging.info("%-28s %.4f", r["method"], r["test_accuracy"])


if __name__ == "__main__":
  cli.run(main)
