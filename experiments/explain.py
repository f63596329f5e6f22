r"""Explains a trained run's split (or image files) with many methods and measures how
faithful and robust each explanation is.

  python -m experiments.explain --workdir=/tmp/mnist --split=test --rows=0:512 \
      --methods=gradcam,integrated_gradients,deeplift --metrics=deletion,insertion,road

Each method runs as one jitted program per fixed-size batch over every device (the batch
sharded, the weights replicated; one compilation per method); the split is read once, a
batch at a time, so a large split streams. Writes to <workdir>/explain/ (or --output): <method>.npy, the maps
(rows, h, w) in float16 (a CAM at its layer's resolution, attributions summed over
channels); metrics.json and metrics.csv, each metric's mean and standard deviation per
method with images/s and the compilation time; metrics.png, the methods x metrics table;
<method>.png, the first --examples images with their maps; methods.png, those images under
every method; rows.json, the rows explained
with their labels and the classes explained. Methods and metrics: convjax/viz/explain.py.
"""

import contextlib
import csv
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from convjax import cli, files, inference, parallel, run
from convjax.data.splits import open_source
from convjax.errors import UserError
from convjax.models import init_variables
from convjax.viz import cam, explain, plots

flags.DEFINE_string("workdir", None, "A trained run's workdir.")
flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Which of the run's splits.")
flags.DEFINE_string("rows", "", "START:STOP of the split ('' -> every row).")
flags.DEFINE_string("images", None, "Image files instead of a split (a folder, recursively, or a glob).")
flags.DEFINE_string("methods", "gradcam,integrated_gradients", f"Comma-separated, of: {', '.join(explain.METHODS)}.")
flags.DEFINE_string("metrics", "deletion,insertion,road", f"Comma-separated, of: {', '.join(explain.METRICS)}.")
flags.DEFINE_enum("target", "predicted", ["predicted", "label"], "The class explained for each image.")
flags.DEFINE_integer("batch_size", 64, "Images per program (divisible by the devices; the last batch is padded).")
flags.DEFINE_integer("num_devices", 0, "Devices to shard the batch over (0: every device).")
flags.DEFINE_string("layer", "", "The CAMs' layer (a Conv2D's name; '' -> the last).")
flags.DEFINE_integer("ig_steps", 32, "Integrated Gradients' intervals.")
flags.DEFINE_integer("samples", 16, "Noise tunnels' and GradientSHAP's samples.")
flags.DEFINE_enum(
  "baseline", "zeros", ["zeros", "blurred", "uniform"], "Integrated Gradients' and DeepLIFT's baseline."
)
flags.DEFINE_integer("patch", 4, "Feature ablation's grid segment side (pixels).")
flags.DEFINE_integer("sensitivity_samples", 10, "Max-sensitivity's perturbations.")
flags.DEFINE_integer("examples", 8, "Images drawn per method in <method>.png.")
flags.DEFINE_integer("seed", 0, "Seed of the noise of every method and metric.")
flags.DEFINE_enum("weights", "tested", run.WEIGHTS, "Which of the run's weights (see docs/using-a-run.md).")
flags.DEFINE_string("output", "", "Output folder ('' -> <workdir>/explain).")
flags.mark_flags_as_required(["workdir"])


def _names(value: str, valid: tuple, flag: str) -> list:
  names = [n.strip() for n in value.split(",") if n.strip()]
  unknown = [n for n in names if n not in valid]
  if unknown or (flag == "methods" and not names):
    raise UserError(f"--{flag}={value!r}: unknown {unknown or 'none given'}; valid: {', '.join(valid)}")
  return names


def _rows(spec: str, size: int) -> range:
  if not spec:
    return range(size)
  try:
    start, stop = (int(v) if v else d for v, d in zip(spec.split(":"), (0, size), strict=True))
  except ValueError:
    raise UserError(f"--rows={spec!r}: give START:STOP, e.g. 0:256") from None
  if not 0 <= start < stop <= size:
    raise UserError(f"--rows={spec!r}: the split has rows 0:{size}")
  return range(start, stop)


def _batches(f, classifier, batch: int):
  """(uint8 images, labels (-1: unknown), names of the rows) a batch at a time, and the count."""
  if f.images:
    images, read, _ = inference.read_images(inference.list_images(f.images), classifier)
    if not read:
      raise UserError(f"--images={f.images!r}: no image could be read")
    labels = np.array([inference.folder_class(p, classifier.classes) for p in read], np.int64)
    chunks = ((images[i : i + batch], labels[i : i + batch], read[i : i + batch]) for i in range(0, len(read), batch))
    return chunks, len(read)
  config = run.read_config(f.workdir)
  source = open_source(config.data)
  splits = source.splits(stream=source.streams)
  if f.split not in splits:
    raise UserError(f"--split={f.split}: the run has splits {', '.join(splits)}")
  split = splits[f.split]
  rows = _rows(f.rows, split.size)
  logging.info("explaining %s: %s rows %d:%d", f.split, split.spec, rows.start, rows.stop)

  def read():
    for start in range(rows.start, rows.stop, batch):
      got = split.read(start, min(start + batch, rows.stop))
      yield (
        got["image"],
        np.asarray(got["label"], np.int64),
        [f"{f.split}[{start + i}]" for i in range(len(got["label"]))],
      )

  return read(), len(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  methods = _names(f.methods, explain.METHODS, "methods")
  metrics = _names(f.metrics, explain.METRICS, "metrics")
  if not os.path.exists(os.path.join(f.workdir, "config.json")):
    raise UserError(f"{f.workdir!r} has no config.json: not a training run")
  if run.read_config(f.workdir).feature_extractor.model:
    raise UserError(f"{f.workdir} trained a head on a frozen base's features: explain explains models of images")
  classifier = inference.from_run(f.workdir, f.weights)
  model, variables, shape = classifier.model, classifier.variables["model"], classifier.image_shape
  mesh = parallel.make_mesh(f.num_devices or None)
  if f.batch_size < 1 or f.batch_size % mesh.size:
    raise UserError(f"--batch_size={f.batch_size} is not a positive multiple of the {mesh.size} devices in use")
  convs = explain.conv_layers(model, shape)
  by_name = {p[-1]: p for p in convs}
  needs_layer = [m for m in methods if m in (*cam.CAMS, "guided_gradcam", "layercam_fused")]
  if needs_layer and not convs:
    raise UserError(f"--methods {','.join(needs_layer)} need a conv layer; {classifier.name}'s model has none")
  if f.layer and f.layer not in by_name:
    raise UserError(f"--layer={f.layer!r} is not a conv layer of the model; it has {', '.join(by_name)}")
  options = explain.Options(
    layer=by_name[f.layer] if f.layer else (convs[-1] if convs else ()),
    fused_layers=tuple(convs),
    ig_steps=f.ig_steps,
    samples=f.samples,
    baseline=f.baseline,
    patch=f.patch,
    sensitivity_samples=f.sensitivity_samples,
  )
  random_variables = init_variables(model, jax.random.key(f.seed + 1), shape)
  out = files.make_dir(f.output or os.path.join(f.workdir, "explain"))
  replicated, sharded = parallel.replicated(mesh), parallel.sharded(mesh)
  weights = parallel.put_replicated_tree(mesh, (variables, jax.device_get(random_variables)))
  prepare, use_label = classifier.prepare, f.target == "label"

  def step(method, weights, images, labels, rng):
    trained, fresh = weights
    x = prepare(images.astype(jnp.float32))
    classes = labels if use_label else None  # None: each method predicts them in its own pass
    return explain.measure(model, trained, fresh, x, classes, method, options, metrics, rng)

  spec = (
    weights,
    jax.ShapeDtypeStruct((f.batch_size, *shape), jnp.uint8),
    jax.ShapeDtypeStruct((f.batch_size,), jnp.int32),
    jax.random.key(0),
  )
  compiled, compile_seconds = {}, {}
  for method in methods:  # one program per method, compiled before the split is read
    started = time.perf_counter()
    program = jax.jit(functools.partial(step, method), in_shardings=(replicated, sharded, sharded, replicated))
    compiled[method] = program.lower(*spec).compile()
    compile_seconds[method] = time.perf_counter() - started
  batches, count = _batches(f, classifier, f.batch_size)
  per_image = {m: {k: [] for k in metrics} for m in methods}
  seconds, first = dict.fromkeys(methods, 0.0), {}
  explained, names, labels_all = [], [], []
  # The split is read once; each batch goes through every method. The maps' .npy files are
  # written a batch at a time through files.output (each header first): a split larger than
  # memory streams to disk, and a failed write is one error line.
  with contextlib.ExitStack() as stack:
    maps_files = {}
    for method in methods:
      maps_files[method] = stack.enter_context(files.output(os.path.join(out, f"{method}.npy"), "wb"))
      map_shape = compiled[method].out_info[0].shape[1:]
      header = {"descr": np.dtype(np.float16).str, "fortran_order": False, "shape": (count, *map_shape)}
      np.lib.format.write_array_header_2_0(maps_files[method], header)
    for index, (images, labels, row_names) in enumerate(batches):
      n = len(images)
      if use_label and (labels < 0).any():
        raise UserError(f"--target=label: {row_names[int(np.argmin(labels))]} has no label (its folder is no class)")
      padded = np.zeros((f.batch_size, *shape), np.uint8)
      padded[:n] = images
      label_batch = np.zeros(f.batch_size, np.int32)
      label_batch[:n] = np.maximum(labels, 0)
      inputs = (jax.device_put(padded, sharded), jax.device_put(label_batch, sharded))
      rng = jax.random.fold_in(jax.random.key(f.seed), index)
      for method in methods:
        started = time.perf_counter()
        maps, scores, classes = compiled[method](weights, *inputs, rng)
        maps, classes = np.asarray(maps)[:n], np.asarray(classes)[:n]
        scores = {k: np.asarray(v)[:n] for k, v in scores.items()}
        seconds[method] += time.perf_counter() - started
        if index == 0:
          first[method] = (padded[: min(f.examples, n)], maps[: f.examples], classes[: f.examples])
        maps_files[method].write(maps.astype(np.float16).tobytes())
        for k, v in scores.items():
          per_image[method][k].append(v)
      explained.extend(int(c) for c in classes)  # the same classes for every method
      names.extend(row_names)
      labels_all.extend(int(v) for v in labels)
  summary = {}
  for method in methods:
    values = {k: np.concatenate(v) for k, v in per_image[method].items()}
    summary[method] = {
      **{k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in values.items()},
      "images_per_second": count / seconds[method] if seconds[method] else 0.0,
      "compile_seconds": compile_seconds[method],
      "images": count,
    }
    logging.info(
      "%s: %s; %.1f images/s (compiled in %.1fs)",
      method,
      ", ".join(f"{k} {summary[method][k]['mean']:.4g}" for k in metrics),
      summary[method]["images_per_second"],
      compile_seconds[method],
    )
    _draw(first[method], method, classifier, os.path.join(out, f"{method}.png"))
  if len(methods) > 1:
    _draw_every_method(first, methods, classifier, os.path.join(out, "methods.png"))
  _write_tables(summary, methods, metrics, out, f, mesh.size)
  files.write_json(
    os.path.join(out, "rows.json"), {"rows": names, "labels": labels_all, "classes_explained": explained}
  )
  print(f"explained {len(names):,} images with {len(methods)} methods on {mesh.size} device(s); see {out}")


def _overlays(first) -> list:
  """Each of the first images with its map (its positive part, scaled to its maximum) over it."""
  images, maps, _ = first
  return [
    cam.superimpose(image, np.clip(np.asarray(m, np.float32), 0, None) / max(float(np.max(m)), 1e-12))
    for image, m in zip(images, maps, strict=True)
  ]


def _class_name(classifier, c: int) -> str:
  return classifier.classes[c] if c < len(classifier.classes) else str(c)


def _draw(first, method, classifier, path):
  panels = _overlays(first)
  titles = [f"{method}\n{_class_name(classifier, c)}" for c in first[2]]
  plots.image_grid(panels, path, cols=min(4, len(panels)), titles=titles)


def _draw_every_method(first, methods, classifier, path):
  """methods.png: the same images (rows) under every method (columns)."""
  overlays = {m: _overlays(first[m]) for m in methods}
  classes = first[methods[0]][2]
  panels = [overlays[m][i] for i in range(len(classes)) for m in methods]
  titles = [
    f"{m}\n{_class_name(classifier, c)}" if i == 0 else _class_name(classifier, c)
    for i, c in enumerate(classes)
    for m in methods
  ]
  plots.image_grid(panels, path, cols=len(methods), titles=titles, size=1.8)


def _write_tables(summary, methods, metrics, out, f, devices):
  files.write_json(
    os.path.join(out, "metrics.json"),
    {
      "workdir": f.workdir,
      "split": None if f.images else f.split,
      "rows": f.rows,
      "images": f.images,
      "devices": devices,
      "device_kind": jax.devices()[0].device_kind,
      "lower_is_better": {m: explain.LOWER_IS_BETTER[m] for m in metrics},
      "methods": summary,
    },
  )
  with files.output(os.path.join(out, "metrics.csv"), newline="") as fh:
    writer = csv.writer(fh)
    writer.writerow(
      ["method", *[f"{m}_{s}" for m in metrics for s in ("mean", "std")], "images_per_second", "compile_seconds"]
    )
    for method in methods:
      row = summary[method]
      writer.writerow(
        [
          method,
          *[f"{row[m][s]:.6g}" for m in metrics for s in ("mean", "std")],
          f"{row['images_per_second']:.2f}",
          f"{row['compile_seconds']:.2f}",
        ]
      )
  if metrics:
    table = np.array([[summary[method][m]["mean"] for m in metrics] for method in methods])
    plots.metrics_table(
      table,
      methods,
      [f"{m} ({'lower' if explain.LOWER_IS_BETTER[m] else 'higher'} better)" for m in metrics],
      os.path.join(out, "metrics.png"),
      [explain.LOWER_IS_BETTER[m] for m in metrics],
    )


if __name__ == "__main__":
  cli.run(main)
