r"""The accelerator check: throughput, MNIST time to 0.99 and streamed cats-vs-dogs, in one
command that needs JAX but not TensorFlow (the data are carried as .npz and JPEG folders).

On a machine with TensorFlow/TFDS (once), the data for it:

  TFDS_DATA_DIR=../shared/datasets/tfds python -m experiments.accelerator_check --prepare=/tmp/carry

On the accelerator machine (<= 8 minutes on one GPU):

  python -m experiments.accelerator_check --data=/tmp/carry --workdir=/tmp/check

1. the benchmark grid of the platform (configs/benchmark.py's 'gpu' preset: VGG16-224 and
   ResNet-50 at batch 128/256 in bfloat16 and float32, PyTorch eager and torch.compile peers);
   and the explanation methods' rows (EXPLAIN_METHODS on the MNIST and cats-vs-dogs convnets,
   batch 64, float32; no peers: pytorch-grad-cam and captum are not carried);
2. the MNIST recipe trained from <data>/mnist/{train,test}.npz until test accuracy 0.99: the
   training seconds to it (compilation reported apart);
3. the cats-vs-dogs convnet trained from <data>/cats_and_dogs_small's JPEGs through the
   streaming pipeline (grain), its step against a batch already on the device: input-bound or
   step-bound.

Each part is one of the project's binaries in its own process; <workdir>/check.json and
check.md gather them. --tiny runs each part for a few steps (CI runs it on CPU with
TensorFlow blocked, so the check cannot rot).
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags, logging

from convjax import cli, files, run
from convjax.errors import UserError

flags.DEFINE_string("data", None, "The carried data: mnist/{train,test}.npz, cats_and_dogs_small/.")
flags.DEFINE_string("workdir", None, "Where the parts' outputs, check.json and check.md go.")
flags.DEFINE_string("prepare", None, "Write the carried data to this folder (needs TFDS) and exit.")
flags.DEFINE_integer("cats_per_class", 500, "--prepare: training photos per class carried (validation: half).")
flags.DEFINE_bool("tiny", False, "A few steps of each part (CI, on CPU).")

# The explanation rows (images/s of each method's maps of a batch, BENCHMARKS.md's CPU rows).
EXPLAIN_METHODS = "gradcam,gradcam++,scorecam,gradient,integrated_gradients,smoothgrad,deeplift,guided_backprop"
CATS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "datasets", "cats_and_dogs_small"
)


def prepare(out: str, cats_per_class: int) -> None:
  """<out>/mnist/{train,test}.npz from TFDS' MNIST and <out>/cats_and_dogs_small, a copy of
  the first photos of each class: small enough to carry (the device machine reads no TFDS)."""
  from convjax.data import tfds as tfds_data

  if os.path.exists(out):
    raise UserError(f"--prepare={out} exists; give a new folder")
  builder = tfds_data.get_builder("mnist", None, False)
  files.make_dir(os.path.join(out, "mnist"))
  for split in ("train", "test"):
    rows = tfds_data.read_rows(builder, tfds_data.row_range(builder, split))
    with files.output(os.path.join(out, "mnist", f"{split}.npz"), "wb") as npz:
      np.savez_compressed(npz, image=rows["image"], label=rows["label"])
  for split, n in (("train", cats_per_class), ("validation", cats_per_class // 2)):
    for c in ("cats", "dogs"):
      files.make_dir(os.path.join(out, "cats_and_dogs_small", split, c))
      for name in sorted(os.listdir(os.path.join(CATS, split, c)))[:n]:
        with open(os.path.join(CATS, split, c, name), "rb") as photo:
          files.write_bytes(os.path.join(out, "cats_and_dogs_small", split, c, name), photo.read())
  logging.info("wrote %s", out)


def binary(name: str, *args: str) -> tuple:
  """Runs `python -m experiments.<name> args`; (seconds, stderr tail). A failure is a UserError."""
  started = time.perf_counter()
  result = subprocess.run([sys.executable, "-m", f"experiments.{name}", *args], capture_output=True, text=True)
  seconds = time.perf_counter() - started
  if result.returncode:
    raise UserError(
      f"experiments.{name} failed (exit {result.returncode}): "
      f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}"
    )
  return seconds, result.stderr


def check(data: str, workdir: str, tiny: bool) -> dict:
  mnist, cats = os.path.join(data, "mnist"), os.path.join(data, "cats_and_dogs_small")
  for path in (os.path.join(mnist, "train.npz"), os.path.join(mnist, "test.npz"), os.path.join(cats, "train")):
    if not os.path.exists(path):
      raise UserError(f"--data={data}: {path} is missing (write it with --prepare where TFDS is installed)")
  out = {}
  small = ["--config.steps=20", "--config.warmup=1", "--config.batch_sizes=(8,)"] if tiny else []
  seconds, _ = binary(
    "benchmark",
    "--config=configs/benchmark.py",
    f"--workdir={workdir}/benchmark",
    "--config.pipeline=",
    *(
      small
      + [
        "--config.models=mnist_convnet@28x28x1",
        "--config.precisions=('float32',)",
        "--config.peers=",
        "--config.modes=('train',)",
      ]
      if tiny
      else []
    ),
  )
  with open(os.path.join(workdir, "benchmark", "benchmark.json")) as f:
    out["benchmark"] = json.load(f)
  out["benchmark"]["seconds"] = seconds

  seconds, _ = binary(
    "benchmark",
    "--config=configs/benchmark.py",
    f"--workdir={workdir}/explain",
    "--config.pipeline=",
    "--config.peers=",  # pytorch-grad-cam and captum are not on the device machine
    "--config.modes=('explain',)",
    "--config.precisions=('float32',)",
    *(
      small + ["--config.models=mnist_convnet@28x28x1", "--config.explain_methods=gradcam,gradient"]
      if tiny
      else ["--config.models=mnist_convnet@28x28x1,cats_dogs_convnet@150x150x3", "--config.batch_sizes=(64,)"]
      + [f"--config.explain_methods={EXPLAIN_METHODS}"]
    ),
  )
  with open(os.path.join(workdir, "explain", "benchmark.json")) as f:
    out["explain"] = {"wall_seconds": seconds, "rows": json.load(f)["rows"]}

  mnist_run = os.path.join(workdir, "mnist")
  budget = (
    ["--config.num_epochs=1", "--config.steps_per_epoch=20", "--config.target_accuracy=0.5"]
    if tiny
    else ["--config.num_epochs=10", "--config.target_accuracy=0.99", "--config.batch_size=128"]
  )
  seconds, _ = binary(
    "train",
    "--config=configs/mnist.py",
    f"--workdir={mnist_run}",
    "--config.data.dataset=",
    f"--config.data.arrays={mnist}",
    "--config.data.train_split=train",
    "--config.data.test_split=test",
    "--config.data.validation_size=0.1",
    "--config.target_split=test",
    "--config.overwrite=True",
    *budget,
  )
  history = run.read_history(mnist_run)
  epochs = [r for r in history if "epoch" in r]
  target = 0.5 if tiny else 0.99
  reached = [r for r in epochs if r.get("test_accuracy", 0) >= target]
  out["mnist"] = {
    "wall_seconds": seconds,
    "epochs": len(epochs),
    "history": history,
    "target": target,
    "reached": reached[0] if reached else None,
    # the epochs' own seconds (training and evaluation; the first includes compilation)
    "epoch_seconds_to_target": sum(r["seconds"] for r in epochs[: epochs.index(reached[0]) + 1]) if reached else None,
  }

  image = "@64x64" if tiny else "@150x150"
  seconds, _ = binary(
    "benchmark",
    "--config=configs/benchmark.py",
    f"--workdir={workdir}/cats",
    "--config.models=",
    f"--config.pipeline=cats_dogs_convnet:folder:{cats}/train{image}",
    "--config.pipeline_modes=('stream',)",
    f"--config.workers=({'0' if tiny else '0, 4'},)",
    *(small or ["--config.batch_sizes=(32, 128)"]),
  )
  with open(os.path.join(workdir, "cats", "benchmark.json")) as f:
    rows = json.load(f)["pipeline"]
  for r in rows:
    step_rate = r["batch"] / r["synthetic_step_seconds_median"]
    r["bound"] = "input-bound" if (r["input_images_per_second"] or 0) < step_rate else "step-bound"
  out["cats"] = {"wall_seconds": seconds, "rows": rows}
  return out


def markdown(result: dict) -> str:
  env = result["benchmark"]["environment"]
  lines = [
    f"# Accelerator check: {env['device_kind']} x{env['device_count']}, jax {env['jax']}",
    "",
    "| model | input | batch | precision | mode | images/s | % of peak | peers (convjax / peer) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in result["benchmark"]["rows"]:
    peers = "; ".join(
      f"{p} {v['images_per_second']:.0f} ({v['ratio']:.2f}x)" for p, v in r.get("peers", {}).items() if "ratio" in v
    )
    lines.append(
      f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['batch']} | {r['precision']} | "
      f"{r['mode']} | {r['images_per_second']:.1f} | "
      f"{'-' if r['percent_of_peak'] is None else format(r['percent_of_peak'], '.1f')} | {peers} |"
    )
  lines += [
    "",
    "Explanations (float32, convjax alone):",
    "",
    "| model | batch | method | images/s | compile s |",
    "|---|---|---|---|---|",
  ]
  lines += [
    f"| {r['model']} | {r['batch']} | {r['method']} | {r['images_per_second']:.1f} | {r['compile_seconds']:.1f} |"
    for r in result["explain"]["rows"]
  ]
  m = result["mnist"]
  reached = m["reached"]
  lines += [
    "",
    f"MNIST to test accuracy {m['target']}: "
    + (
      f"{reached['test_accuracy']:.4f} at epoch {reached['epoch']}, {m['epoch_seconds_to_target']:.1f} s of "
      f"epochs (the first includes compilation), {reached['wall_seconds']:.1f} s since the start"
      if reached
      else f"not reached in {m['epochs']} epochs"
    )
    + f" (binary wall {m['wall_seconds']:.0f} s with start-up)",
    "",
    "Cats vs dogs, JPEG folders streamed:",
    "",
    "| batch | workers | real step ms | on-device step ms | input images/s | bound |",
    "|---|---|---|---|---|---|",
  ]
  lines += [
    f"| {r['batch']} | {r['workers']} | {1e3 * r['real_step_seconds_median']:.1f} | "
    f"{1e3 * r['synthetic_step_seconds_median']:.1f} | {r['input_images_per_second'] or 0:,.0f} | {r['bound']} |"
    for r in result["cats"]["rows"]
  ]
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.prepare:
    prepare(f.prepare, f.cats_per_class)
    return
  if not (f.data and f.workdir):
    raise UserError("give --data=DIR --workdir=DIR (or --prepare=DIR where TFDS is installed)")
  started = time.perf_counter()
  result = check(f.data, f.workdir, f.tiny)
  result["seconds"] = time.perf_counter() - started
  files.write_json(os.path.join(f.workdir, "check.json"), result)
  text = markdown(result) + f"\nTotal {result['seconds']:.0f} s.\n"
  files.write_text(os.path.join(f.workdir, "check.md"), text)
  print(text)


if __name__ == "__main__":
  cli.run(main)
