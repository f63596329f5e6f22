"""The convolution primer: the notes' worked examples, three equal convolutions, arithmetic."""

import numpy as np
import pytest

from convjax import primer
from convjax.models import get_model
from convjax.models.summary import layer_table
from tests.conftest import SHARED, run_binary

# The notes' 5x5 image patch and the 7x7 curve-detector example.
PATCH = np.array(
  [
    [105, 102, 100, 97, 96],
    [103, 99, 103, 101, 102],
    [101, 98, 104, 102, 100],
    [99, 101, 106, 104, 99],
    [104, 104, 104, 100, 98],
  ],
  np.float32,
)
CURVE = np.zeros((7, 7), np.float32)
CURVE[[0, 1, 2, 3, 4, 5], [5, 4, 3, 3, 3, 3]] = 30
CURVE_FIELD = np.array(
  [
    [0, 0, 0, 0, 0, 0, 30],
    [0, 0, 0, 0, 50, 50, 50],
    [0, 0, 0, 20, 50, 0, 0],
    [0, 0, 0, 50, 50, 0, 0],
    [0, 0, 0, 50, 50, 0, 0],
    [0, 0, 0, 50, 50, 0, 0],
    [0, 0, 0, 50, 50, 0, 0],
  ],
  np.float32,
)
OTHER_FIELD = np.array(
  [
    [0, 0, 0, 0, 0, 0, 0],
    [0, 40, 0, 0, 0, 0, 0],
    [40, 0, 40, 0, 0, 0, 0],
    [40, 20, 0, 0, 0, 0, 0],
    [0, 50, 0, 0, 0, 0, 0],
    [0, 0, 50, 0, 0, 0, 0],
    [25, 25, 0, 50, 0, 0, 0],
  ],
  np.float32,
)


def test_sharpen_kernel_gives_320_at_the_first_position():
  out = primer.conv2d(PATCH, primer.SHARPEN, padding="same")
  assert out.shape == (5, 5)
  assert float(out[0, 0]) == 320.0  # 105*5 - 102 - 103, zero padding around the patch
  assert float(out[1, 1]) == 99 * 5 - 102 - 103 - 103 - 98


def test_curve_detector_fires_on_the_curve_only():
  assert float(primer.conv2d(CURVE_FIELD, CURVE)[0, 0]) == 6600.0
  assert float(primer.conv2d(OTHER_FIELD, CURVE)[0, 0]) == 0.0


@pytest.mark.parametrize("stride,padding", [(1, "valid"), (1, "same"), (2, "valid"), (2, "same"), (3, 2)])
def test_lax_convolution_equals_the_loop(stride, padding):
  rng = np.random.default_rng(0)
  image, kernel = rng.normal(size=(11, 9, 3)), rng.normal(size=(3, 3, 3))
  fast = primer.conv2d(image, kernel, stride, padding)
  slow = primer.conv2d_loop(image, kernel, stride, padding)
  assert fast.shape == slow.shape
  np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
  # flip=True is the mathematical convolution: the same as correlating with the rotated kernel.
  np.testing.assert_allclose(
    primer.conv2d(image, kernel, stride, padding, flip=True),
    primer.conv2d_loop(image, kernel[::-1, ::-1], stride, padding),
    rtol=1e-5,
    atol=1e-5,
  )


def test_sobel_finds_vertical_and_horizontal_edges():
  image = np.zeros((8, 8), np.float32)
  image[:, 4:] = 1.0  # a vertical edge between columns 3 and 4
  gx, gy, magnitude = primer.sobel(image)
  assert np.abs(gy[1:-1, 1:-1]).max() == 0.0  # no horizontal edge inside
  # Inside the image only columns 3 and 4 see the edge (column 7 meets the zero padding).
  assert set(np.flatnonzero(np.abs(gx[4, :7]) > 0)) == {3, 4} and float(abs(gx[4, 3])) == 4.0
  np.testing.assert_allclose(primer.sobel(image.T)[1], np.asarray(gx).T, atol=1e-6)  # Gy = Gx rotated
  assert float(magnitude[4, 4]) == 4.0


def test_gabor_bank_answers_to_matching_orientation_and_frequency():
  y, x = np.mgrid[0:64, 0:64]
  for theta in (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4):
    grating = np.cos(2 * np.pi * 0.25 * (x * np.cos(theta) + y * np.sin(theta))).astype(np.float32)
    energy = [
      (float(np.abs(primer.conv2d(grating, k)).mean()), f, t) for f, t, _, k in primer.gabor_bank(sigmas=(3.0,))
    ]
    _, best_f, best_t = max(energy)
    assert best_f == 0.25 and np.isclose(best_t, theta), (theta, best_f, best_t)
  kernel = primer.gabor_kernel(0.1, 0.3, 2.0)
  assert kernel.shape == (13, 13) and abs(float(kernel.sum())) < 1e-6  # zero mean: no response to flat


def test_conv_arithmetic_and_the_mnist_chain():
  assert primer.output_size(28, 3) == 26 and primer.output_size(224, 7, 3, 2) == 112
  assert primer.output_size(5, 3, primer.same_padding(3)) == 5
  assert primer.conv_params(3, 1, 32) == 320 and primer.conv_params(3, 32, 64) == 18_496
  assert [primer.receptive_field([(3, 1)] * n) for n in (1, 2, 3)] == [3, 5, 7]
  assert primer.receptive_field([(3, 1), (2, 2), (3, 1)]) == 8
  chain = primer.size_chain(28, [("conv", 3), ("pool", 2), ("conv", 3), ("pool", 2), ("conv", 3)])
  assert chain == [28, 26, 13, 11, 5, 3]
  rows = layer_table(get_model("mnist_convnet"), (28, 28, 1))
  assert [r.output_shape[1] for r in rows if r.type_name in ("Conv2D", "MaxPooling2D")] == chain[1:]
  convs = [r for r in rows if r.type_name == "Conv2D"]
  assert [r.trainable for r in convs] == [
    primer.conv_params(3, 1, 32),
    primer.conv_params(3, 32, 64),
    primer.conv_params(3, 64, 64),
  ]
  with pytest.raises(ValueError, match="odd kernels"):
    primer.same_padding(4)


def test_primer_binary_writes_the_figures(tmp_path):
  result = run_binary(
    "experiments.primer",
    f"--image={SHARED / 'datasets' / 'images' / 'skimage_chelsea_cat.png'}",
    f"--output_dir={tmp_path}",
    "--size=96",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  for name in ("sobel.png", "gabor_bank.png", "gabor_responses.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
