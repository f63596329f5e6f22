r"""The convolution primer's figures: Sobel edges and a Gabor filter bank on a real image.

  python -m experiments.primer --image=../shared/datasets/images/skimage_chelsea_cat.png \
      --output_dir=/tmp/primer

Writes sobel.png (image, Gx, Gy, gradient magnitude), gabor_bank.png (the
kernels) and gabor_responses.png (each kernel's response map on the image).
"""

import os

import numpy as np
from absl import app, flags, logging

from convjax import cli, files, primer
from convjax.data.folders import decode_image
from convjax.viz.plots import image_grid

flags.DEFINE_string("image", None, "Image file (converted to grayscale).")
flags.DEFINE_string("output_dir", None, "Folder for the PNGs.")
flags.DEFINE_integer("size", 256, "Resize the image's longer side to this many pixels (0: keep).")
flags.mark_flags_as_required(["image", "output_dir"])


def _normalise(x):
  """Min-max to [0, 1] for display (a constant map becomes 0)."""
  x = np.asarray(x, np.float32)
  span = x.max() - x.min()
  return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  image = decode_image(f.image, 1, None)
  if f.size:
    scale = f.size / max(image.shape[:2])
    image = decode_image(f.image, 1, (round(image.shape[0] * scale), round(image.shape[1] * scale)))
  gray = image[..., 0].astype(np.float32) / 255.0
  files.make_dir(f.output_dir)

  gx, gy, magnitude = primer.sobel(gray)
  maps = [gray, np.abs(gx), np.abs(gy), magnitude]
  image_grid(
    np.stack([_normalise(m)[..., None] for m in maps]),
    os.path.join(f.output_dir, "sobel.png"),
    cols=4,
    titles=["image", "|Gx| (vertical edges)", "|Gy| (horizontal edges)", "magnitude"],
    size=3.5,
  )

  bank = primer.gabor_bank()
  titles = [f"f={fr:g} θ={np.degrees(t):.0f}° σ={s:g}" for fr, t, s, _ in bank]
  side = max(k.shape[0] for *_, k in bank)
  kernels = np.stack([np.pad(_normalise(k), (side - k.shape[0]) // 2)[..., None] for *_, k in bank])
  image_grid(kernels, os.path.join(f.output_dir, "gabor_bank.png"), cols=4, titles=titles)
  responses = np.stack([_normalise(np.abs(primer.conv2d(gray, k, padding="same")))[..., None] for *_, k in bank])
  image_grid(responses, os.path.join(f.output_dir, "gabor_responses.png"), cols=4, titles=titles, size=3.0)
  logging.info("wrote sobel.png, gabor_bank.png, gabor_responses.png to %s", f.output_dir)


if __name__ == "__main__":
  cli.run(main)
