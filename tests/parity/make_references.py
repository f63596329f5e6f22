r"""The reference maps of pytorch-grad-cam and captum that tests/test_parity.py compares
convjax's with: run once, in a venv with torch, grad-cam and captum beside convjax (its
PyTorch copies of the networks are convjax/peers.py's), from the repository root:

  python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch grad-cam captum -e .
  /tmp/torchvenv/bin/python tests/parity/make_references.py

Writes tests/parity/<model>.npz: the images (uint8, NHWC), the weights' seed (weights.py),
its logits, the classes explained and each method's maps: the CAMs captured before pytorch-grad-cam's
ReLU and scaling, at the layer's resolution (the test applies one normalisation to both
sides); the attributions summed over the channels. Everything is computed in float64 and
stored in float32: float32 gradients of these networks move with the CPU (an AVX2-only
CPU's differ from an AVX-512 one's by up to 2% of the largest value on the cats-vs-dogs
convnet: ReLUs whose inputs are near 0 switch), float64 ones do not.
"""

import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import captum.attr as ca  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytorch_grad_cam as gc  # noqa: E402
import pytorch_grad_cam.base_cam as base_cam  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from convjax import peers  # noqa: E402
from convjax.models import get_model  # noqa: E402
from tests.parity.weights import he_weights, nested, paths  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(HERE)), "..", "shared", "datasets")
CAMS = {
  "gradcam": gc.GradCAM,
  "gradcam++": gc.GradCAMPlusPlus,
  "xgradcam": gc.XGradCAM,
  "hirescam": gc.HiResCAM,
  "layercam": gc.LayerCAM,
  "eigencam": gc.EigenCAM,
  "eigengradcam": gc.EigenGradCAM,
  "scorecam": gc.ScoreCAM,
}
SEED = 0
IG_STEPS = {"mnist_convnet": 32, "cats_dogs_convnet": 8}  # convjax's intervals; captum's
# riemann_trapezoid takes IG_STEPS + 1 points


def images(name):
  if name == "mnist_convnet":  # MNIST's test[:8], from the arrays the tests write (tests/conftest.py)
    return np.load(os.path.join(tempfile.gettempdir(), "convjax-tests", "mnist-arrays-1", "test500.npz"))["image"][:8]
  folder = os.path.join(SHARED, "cats_and_dogs_small", "test")
  paths = [
    os.path.join(folder, c, sorted(os.listdir(os.path.join(folder, c)))[i]) for c in ("cats", "dogs") for i in (0,)
  ]
  return np.stack([np.asarray(Image.open(p).convert("RGB").resize((150, 150), Image.BILINEAR)) for p in paths])


def torch_copy(name, shape, params):
  """convjax/peers.py's PyTorch network with convjax's weights (HWIO -> OIHW; the first
  Linear's inputs reordered from NHWC's flatten to NCHW's)."""
  model = peers.build_torch(torch, name, shape).eval()
  convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
  linears = [m for m in model if isinstance(m, torch.nn.Linear)]
  features, head = params["features"], params["head"]
  with torch.no_grad():
    for module, key in zip(convs, sorted(features, key=lambda k: (len(k), k)), strict=True):
      module.weight.copy_(torch.from_numpy(np.transpose(features[key]["kernel"], (3, 2, 0, 1)).copy()))
      module.bias.copy_(torch.from_numpy(features[key]["bias"]))
    for i, (module, key) in enumerate(zip(linears, sorted(head, key=lambda k: (len(k), k)), strict=True)):
      kernel = head[key]["kernel"]
      if i == 0:
        flatten = [j for j, m in enumerate(model) if isinstance(m, torch.nn.Flatten)][0]
        c, h, w = model[:flatten](torch.zeros(1, shape[2], *shape[:2])).shape[1:]
        kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
      module.weight.copy_(torch.from_numpy(kernel.T.copy()))
      module.bias.copy_(torch.from_numpy(head[key]["bias"]))
  return model


def raw_cams(model, layer, x, targets):
  """Each CAM method's map before pytorch-grad-cam's ReLU and min-max scaling."""
  captured, original = [], base_cam.scale_cam_image
  base_cam.scale_cam_image = lambda cam, target_size=None: (captured.append(np.array(cam)), np.asarray(cam))[1]
  try:
    out = {}
    for name, cls in CAMS.items():
      captured.clear()
      with cls(model=model, target_layers=[layer]) as method:
        method.get_cam_image = _keep_raw(method.get_cam_image, captured)
        method(input_tensor=x, targets=targets)
      out[name] = captured[0]
    return out
  finally:
    base_cam.scale_cam_image = original


def _keep_raw(get_cam_image, captured):
  def wrapped(*args, **kwargs):
    cam = get_cam_image(*args, **kwargs)
    captured.insert(0, np.array(cam))
    return cam

  return wrapped


def main():
  for name, shape, patch in (("mnist_convnet", (28, 28, 1), 4), ("cats_dogs_convnet", (150, 150, 3), 25)):
    torch.manual_seed(0)
    model = get_model(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))["params"]
    flat = {p: tuple(a.shape) for p, a in paths(shapes)}
    weights = he_weights(flat, SEED)
    params = nested(weights)
    torch_model = torch_copy(name, shape, params).double()
    pictures = images(name)
    x = torch.from_numpy(np.transpose(pictures.astype(np.float64) / 255.0, (0, 3, 1, 2)).copy())
    x.requires_grad_(False)
    logits = torch_model(x).detach().numpy()
    binary = logits.shape[-1] == 1
    classes = np.ones(len(x), np.int64) if binary else np.argmax(logits, -1)
    target_index = np.zeros_like(classes) if binary else classes  # the logit of the class explained
    relus = [m for m in torch_model if isinstance(m, torch.nn.ReLU)]
    flatten = [i for i, m in enumerate(torch_model) if isinstance(m, torch.nn.Flatten)][0]
    layer = [m for i, m in enumerate(torch_model) if isinstance(m, torch.nn.ReLU) and i < flatten][-1]
    assert layer in relus
    targets = [ClassifierOutputTarget(int(t)) for t in target_index]
    target = torch.from_numpy(target_index)
    attributions = {
      "gradient": ca.Saliency(torch_model).attribute(x, target=target, abs=False),
      "input_x_gradient": ca.InputXGradient(torch_model).attribute(x, target=target),
      "integrated_gradients": ca.IntegratedGradients(torch_model).attribute(
        x, target=target, n_steps=IG_STEPS[name] + 1, method="riemann_trapezoid"
      ),
      "deeplift": ca.DeepLift(torch_model).attribute(x, target=target, baselines=x * 0 + 0.5),
      "guided_backprop": ca.GuidedBackprop(torch_model).attribute(x, target=target),
    }
    h, w = shape[:2]
    segments = (np.arange(h)[:, None] // patch) * (-(-w // patch)) + (np.arange(w)[None, :] // patch)
    mask = torch.from_numpy(np.broadcast_to(segments, (len(x), shape[2], h, w)).copy())
    attributions["feature_ablation"] = ca.FeatureAblation(torch_model).attribute(
      x, target=target, feature_mask=mask, baselines=0.0
    )
    maps = raw_cams(torch_model, layer, x, targets)  # after captum's: see the note in raw_cams
    # Fused over every conv layer: each map scaled and resized (cv2), the mean scaled. Before
    # GuidedBackpropReLUModel, which puts one shared ReLU back in every ReLU's place (a hook on
    # it would fire at each).
    convs = [m for i, m in enumerate(torch_model) if isinstance(m, torch.nn.ReLU) and i < flatten]
    with gc.LayerCAM(model=torch_model, target_layers=convs) as method:
      fused = method(input_tensor=x, targets=targets)
    gb = gc.GuidedBackpropReLUModel(torch_model, device="cpu")
    with gc.GradCAM(model=torch_model, target_layers=[layer]) as method:
      scaled = method(input_tensor=x, targets=targets)  # min-max, resized to the input (cv2)
    guided = np.stack([gb(x[i : i + 1], target_category=int(target_index[i])) for i in range(len(x))])
    out = {f"cam/{k}": v.astype(np.float32) for k, v in maps.items()}
    out["cam/layercam_fused"] = fused.astype(np.float32)
    out.update({f"attr/{k}": v.detach().numpy().sum(1).astype(np.float32) for k, v in attributions.items()})
    out["attr/guided_gradcam"] = (guided * scaled[..., None]).sum(-1).astype(np.float32)
    path = os.path.join(HERE, f"{name}.npz")
    np.savez_compressed(
      path,
      images=pictures,
      seed=SEED,
      logits=logits.astype(np.float32),
      classes=classes,
      patch=patch,
      ig_steps=IG_STEPS[name],
      deeplift_baseline=0.5,
      **out,
    )
    print(f"wrote {path}: {len(pictures)} images, {len(out)} maps; torch {torch.__version__}")


if __name__ == "__main__":
  main()
