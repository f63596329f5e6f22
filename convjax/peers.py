r"""The benchmark's architectures in Keras 3 and PyTorch, timed the same way, for
convjax/peer ratios.

Run as a subprocess (the Keras backend is fixed at import):

  KERAS_BACKEND=jax python -m convjax.peers --framework=keras --model=mnist_convnet \
      --input=28x28x1 --batch=128 --precision=float32 --mode=train --steps=20 --warmup=3
  python -m convjax.peers --framework=torch --compile --model=mnist_convnet ...

prints one JSON line: {"images_per_second", "step_seconds_median", "params"}; with
--rows='[{"model": ..., "input": ..., "batch": ..., ...}, ...]' one line per row, measured in
turn in one process. The benchmark binary runs one `--serve` process per peer (one framework
import per peer, not per row) and asks it for a row's steps in rounds between its own.
Keras: train steps are `train_on_batch` (forward, backward, RMSprop update) on
arrays already converted for the backend, inference `predict_on_batch`;
'bfloat16' is the mixed_bfloat16 policy (float32 variables). PyTorch (eager, or
`torch.compile` with --compile): the same networks in NCHW, RMSprop, inference
under `torch.no_grad`; 'bfloat16' is CPU/GPU autocast. Both as convjax's rows.
"""

import json
import os
import statistics
import sys
import types

import numpy as np
from absl import app, flags

from convjax import cli
from convjax.errors import UserError
from convjax.timing import step_times

flags.DEFINE_enum("framework", "keras", ["keras", "torch"], "Keras 3 (backend: KERAS_BACKEND) or PyTorch.")
flags.DEFINE_bool("compile", False, "PyTorch: torch.compile the step.")
flags.DEFINE_string("model", None, "A network of the benchmark (a convjax.models name).")
flags.DEFINE_string("input", None, "HxWxC, e.g. 28x28x1.")
flags.DEFINE_integer("batch", None, "Batch size.")
flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"], "Compute precision.")
flags.DEFINE_enum("mode", "train", ["train", "inference", "explain"], "Train step, inference step or explanation.")
flags.DEFINE_string(
  "method", "", "explain: the method (convjax.viz.explain's name), run by pytorch-grad-cam or captum."
)
flags.DEFINE_integer("steps", 20, "Steps timed.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first.")
flags.DEFINE_string(
  "rows",
  None,
  "Instead of --model/--input/--batch/--precision/--mode/--method: a JSON list of rows with those "
  "keys, measured one after the other in this process (one import of the framework), a JSON line each.",
)
flags.DEFINE_bool(
  "serve", False, "Measure the rows the benchmark binary asks for on stdin, a JSON line each (its rounds)."
)
ROW_KEYS = ("model", "input", "batch", "precision", "mode", "method")


def build(keras, name: str, shape: tuple):
  layers = keras.layers
  if name == "mnist_convnet":
    return keras.Sequential(
      [
        keras.Input(shape),
        layers.Conv2D(32, 3, activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(64, 3, activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(64, 3, activation="relu"),
        layers.Flatten(),
        layers.Dense(64, activation="relu"),
        layers.Dense(10),
      ]
    )
  if name == "cats_dogs_convnet":
    stack = [keras.Input(shape)]
    for f in (32, 64, 128, 128):
      stack += [layers.Conv2D(f, 3, activation="relu"), layers.MaxPooling2D()]
    return keras.Sequential(stack + [layers.Flatten(), layers.Dense(512, activation="relu"), layers.Dense(1)])
  if name == "vgg16_base":
    return keras.applications.VGG16(weights=None, include_top=False, pooling="avg", input_shape=shape)
  if name == "vgg16":
    return keras.applications.VGG16(weights=None, input_shape=shape, classifier_activation=None)
  if name == "resnet50":  # Keras' ResNet50 is v1 (stride on the first 1x1, conv biases): 25,636,712 params
    return keras.applications.ResNet50(weights=None, input_shape=shape, classifier_activation=None)
  raise UserError(f"no Keras peer for model {name!r}")


def build_torch(torch, name: str, shape: tuple):
  """The networks in PyTorch (no torchvision here: VGG16 written out; no ResNet-50 peer)."""
  nn = torch.nn
  h, w, c = shape

  def convs(widths, pools, in_channels, padding):
    layers = []
    for width, pool in zip(widths, pools, strict=True):
      layers += [nn.Conv2d(in_channels, width, 3, padding=padding), nn.ReLU()]
      if pool:
        layers.append(nn.MaxPool2d(2))
      in_channels = width
    return layers

  if name == "mnist_convnet":
    body = convs((32, 64, 64), (True, True, False), c, 0)
    head = [nn.Flatten(), nn.LazyLinear(64), nn.ReLU(), nn.Linear(64, 10)]
  elif name == "cats_dogs_convnet":
    body = convs((32, 64, 128, 128), (True,) * 4, c, 0)
    head = [nn.Flatten(), nn.LazyLinear(512), nn.ReLU(), nn.Linear(512, 1)]
  elif name in ("vgg16", "vgg16_base"):
    widths = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    pools = (False, True, False, True, False, False, True, False, False, True, False, False, True)
    body = convs(widths, pools, c, 1)
    head = (
      [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
      if name == "vgg16_base"
      else [nn.Flatten(), nn.LazyLinear(4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000)]
    )
  else:
    raise UserError(f"no PyTorch peer for model {name!r}")
  model = nn.Sequential(*body, *head)
  model(torch.zeros(1, c, h, w))  # materialise the lazy layers
  return model


def torch_row(f, shape: tuple):
  """(step, facts): the row's PyTorch step, which waits for its result, and its parameters
  and backend."""
  import torch

  batch = f.batch
  model = build_torch(torch, f.model, shape)
  outputs = model(torch.zeros(1, shape[2], *shape[:2])).shape[-1]
  x = torch.rand(batch, shape[2], *shape[:2])
  y = torch.randint(0, max(outputs, 2), (batch,))
  loss_fn = (
    (lambda out: torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], y.float()))
    if outputs == 1
    else (lambda out: torch.nn.functional.cross_entropy(out, y))
  )
  optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-4, alpha=0.9, eps=1e-7)
  bf16 = f.precision == "bfloat16"

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      loss = loss_fn(model(x).float())
    loss.backward()
    optimizer.step()
    return loss

  def infer_step():
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      return model(x)

  step = train_step if f.mode == "train" else infer_step
  if f.mode == "explain":
    step = torch_explain_step(torch, model, x, f.method)
  if f.compile:
    step = torch.compile(step)
  return lambda: step().float().sum().item(), {  # CPU tensors: the result is complete
    "params": sum(p.numel() for p in model.parameters()),
    "backend": "torch.compile" if f.compile else "torch eager",
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
  }


# The explain rows' peers, with convjax.viz.explain's defaults: 32 IG intervals (captum's
# riemann_trapezoid on 33 points), 16 noise samples (noise tunnels, GradientSHAP), feature
# ablation on 4x4 segments 16 at a time, Score-CAM and Ablation-CAM 16 channels a forward
# pass; every method on the whole batch per call (captum's internal batch: the batch).
GRAD_CAMS = {
  "gradcam": "GradCAM",
  "gradcam++": "GradCAMPlusPlus",
  "xgradcam": "XGradCAM",
  "hirescam": "HiResCAM",
  "layercam": "LayerCAM",
  "eigencam": "EigenCAM",
  "eigengradcam": "EigenGradCAM",
  "scorecam": "ScoreCAM",
  "ablationcam": "AblationCAM",
}


def uniform_baselines(torch, x):
  """Uniform noise over each image's range (convjax.viz.saliency.baseline's "uniform")."""
  low, high = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
  return low + (high - low) * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))


def torch_explain_step(torch, model, x, method: str):
  """A step that explains x's predicted classes with pytorch-grad-cam's (CAMs) or captum's
  (attributions) `method`, returning a tensor."""
  model.eval()
  flatten = [i for i, m in enumerate(model) if isinstance(m, torch.nn.Flatten)][0]
  conv_relus = [m for m in list(model)[:flatten] if isinstance(m, torch.nn.ReLU)]  # each conv's output
  layer = conv_relus[-1]
  if method in GRAD_CAMS or method == "layercam_fused":  # targets=None: its own forward pass predicts
    import pytorch_grad_cam

    if method == "layercam_fused":  # LayerCAM over every conv layer, as convjax's
      cam = pytorch_grad_cam.LayerCAM(model=model, target_layers=conv_relus)
    elif method == "ablationcam":  # 16 channels a forward pass, as convjax's channel_batch
      cam = pytorch_grad_cam.AblationCAM(model=model, target_layers=[layer], batch_size=16)
    else:
      cam = getattr(pytorch_grad_cam, GRAD_CAMS[method])(model=model, target_layers=[layer])
    return lambda: torch.from_numpy(cam(input_tensor=x, targets=None))
  import captum.attr as ca

  def predicted():  # captum takes the target from its user: predicted in the step, as convjax's is
    with torch.no_grad():
      logits = model(x)
    return torch.zeros(len(x), dtype=torch.long) if logits.shape[-1] == 1 else logits.argmax(-1)

  h, w = x.shape[2:]
  segments = (torch.arange(h)[:, None] // 4) * (-(-w // 4)) + torch.arange(w)[None, :] // 4
  calls = {
    "gradient": lambda: ca.Saliency(model).attribute(x, target=predicted(), abs=False),
    "input_x_gradient": lambda: ca.InputXGradient(model).attribute(x, target=predicted()),
    "integrated_gradients": lambda: ca.IntegratedGradients(model).attribute(
      x, target=predicted(), n_steps=33, method="riemann_trapezoid", internal_batch_size=len(x)
    ),
    **{
      tunnel: lambda tunnel=tunnel: ca.NoiseTunnel(ca.Saliency(model)).attribute(
        x, target=predicted(), nt_type=tunnel, nt_samples=16, nt_samples_batch_size=1, stdevs=0.15, abs=False
      )
      for tunnel in ("smoothgrad", "smoothgrad_sq", "vargrad")
    },
    # convjax's baselines: zeros and uniform noise over each image's range; 16 samples, no noise
    "gradient_shap": lambda: ca.GradientShap(model).attribute(
      x, baselines=torch.cat([torch.zeros_like(x), uniform_baselines(torch, x)]), target=predicted(), n_samples=16
    ),
    "deeplift": lambda: ca.DeepLift(model).attribute(x, target=predicted(), baselines=0.0),
    "guided_backprop": lambda: ca.GuidedBackprop(model).attribute(x, target=predicted()),
    "guided_gradcam": lambda: ca.GuidedGradCam(model, layer).attribute(x, target=predicted()),
    "feature_ablation": lambda: ca.FeatureAblation(model).attribute(
      x, target=predicted(), feature_mask=segments.expand(len(x), x.shape[1], h, w), perturbations_per_eval=16
    ),
  }
  if method not in calls:
    raise UserError(f"no pytorch-grad-cam or captum peer for method {method!r}")
  return calls[method]


def keras_row(f, shape: tuple):
  """(step, facts) as torch_row's, in Keras 3."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import keras

  keras.backend.clear_session()  # a row measured after another starts from nothing too
  keras.mixed_precision.set_global_policy("mixed_bfloat16" if f.precision == "bfloat16" else "float32")
  batch = f.batch
  model = build(keras, f.model, shape)
  outputs = model.output_shape[-1]
  loss = (
    keras.losses.BinaryCrossentropy(from_logits=True)
    if outputs == 1
    else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  )
  model.compile(optimizer=keras.optimizers.RMSprop(1e-4), loss=loss)
  rng = np.random.default_rng(0)
  x = keras.ops.convert_to_tensor(rng.random((batch, *shape), np.float32))
  y = keras.ops.convert_to_tensor(
    rng.integers(0, max(outputs, 2), batch).astype(np.float32 if outputs == 1 else np.int32)
  )
  step = (lambda: model.train_on_batch(x, y)) if f.mode == "train" else (lambda: model.predict_on_batch(x))
  return lambda: np.asarray(step()), {  # np.asarray waits for the result
    "params": int(model.count_params()),
    "backend": keras.backend.backend(),
  }


def checked(f, row: dict):
  """(spec, shape) of one row (the flags' defaults where the row is silent); a malformed row is
  a UserError."""
  unknown = sorted(set(row) - set(ROW_KEYS))
  if unknown or not all(row.get(k) for k in ("model", "input", "batch")):
    raise UserError(f"--rows entry {row}: needs model, input and batch, and no other keys than {', '.join(ROW_KEYS)}")
  spec = types.SimpleNamespace(
    **{k: getattr(f, k) for k in ("framework", "compile")},
    **{"precision": "float32", "mode": "train", "method": "", **row},
  )
  try:
    shape = tuple(int(d) for d in str(spec.input).split("x"))
  except ValueError:
    shape = ()
  if len(shape) != 3:
    raise UserError(f"--input={spec.input!r}: expected HxWxC, e.g. 28x28x1")
  if spec.mode == "explain" and (f.framework != "torch" or f.compile):
    raise UserError("explain rows have eager PyTorch peers only (pytorch-grad-cam, captum)")
  return spec, shape


def serve(f) -> None:
  """Once its framework is imported, says {"ready": pid}, then answers the benchmark binary's
  requests, one JSON line each on stdin, {"row": {...},
  "steps": n, "warmup": n}, with one JSON line each, the step times and the row's facts or
  {"error": ...}: the binary alternates rounds of its own steps with the peer's, so that a
  ratio compares steps timed seconds apart. The row last built is kept for the next request
  of the same row."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  __import__("torch" if f.framework == "torch" else "keras")  # the import, before the binary times a step
  print(json.dumps({"ready": os.getpid()}), flush=True)
  built = (None, None, None)
  for line in iter(sys.stdin.readline, ""):
    request = json.loads(line)
    try:
      if built[0] != request["row"]:
        built = (None, None, None)  # the previous row's network goes before the next is built
        spec, shape = checked(f, request["row"])
        built = (request["row"], *(torch_row if f.framework == "torch" else keras_row)(spec, shape))
      answer = {"times": step_times(built[1], request["steps"], request["warmup"]), **built[2], "pid": os.getpid()}
    except Exception as e:  # noqa: BLE001 - one row's failure is that row's answer, not the process's end
      answer = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    print(json.dumps(answer), flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.serve:
    serve(f)
    return
  try:
    rows = json.loads(f.rows) if f.rows else [{k: getattr(f, k) for k in ROW_KEYS}]
  except json.JSONDecodeError as e:
    raise UserError(f"--rows is not a JSON list of rows: {e}") from None
  if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
    raise UserError(f"--rows={f.rows!r}: expected a JSON list of objects, one per row")
  for spec, shape in [checked(f, row) for row in rows]:  # every row is checked before the first is measured
    step, facts = (torch_row if f.framework == "torch" else keras_row)(spec, shape)
    median = statistics.median(step_times(step, f.steps, f.warmup))
    print(json.dumps({"images_per_second": spec.batch / median, "step_seconds_median": median, **facts}), flush=True)


if __name__ == "__main__":
  cli.run(main)
