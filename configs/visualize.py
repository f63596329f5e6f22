r"""What experiments/visualize.py draws, and how.

  python -m experiments.visualize --config=configs/visualize.py --workdir=<a trained run> \
      --image=../shared/datasets/images/dog.4999.jpg [--config.viz.methods=gradcam,saliency]

Without a trained run, `--config.viz.model=vgg16 --config.viz.weights=imagenet`
explains the ImageNet VGG16 itself (the with-top weights download from Keras;
any Keras .h5 of that layout works offline). `--config.viz.model=vgg16_base` is
its conv base (the notop file, offline in ../shared/weights) for activations and
filter patterns, e.g. the notes' 8x8 grids of block1_conv1 ... block5_conv1:

  CONVJAX_WEIGHTS_DIR=../shared/weights python -m experiments.visualize --workdir=/tmp/vgg16 \
      --image=../shared/datasets/images/skimage_chelsea_cat.png --config.viz.model=vgg16_base \
      --config.viz.image_size=150 --config.viz.methods=activations,filters \
      --config.viz.layers=block1_conv1,block2_conv1,block3_conv1,block4_conv1,block5_conv1

Figures go to <workdir>/viz/.
"""

from ml_collections import ConfigDict


def get_config():
  config = ConfigDict()
  v = config.viz = ConfigDict()
  v.methods = "activations,first_layer,filters,top_images,gradcam,saliency,occlusion"
  v.model = ""  # '' -> the run's model; else a pretrained model name (vgg16)
  v.weights = "imagenet"  # with viz.model: 'imagenet' or a Keras .h5 file
  v.image_size = 224  # with viz.model: the input side (a model with Keras' top takes 224)
  v.class_index = -1  # -1 -> the predicted class
  v.layers = ""  # comma-separated layer names for activations/filters; '' -> every
  # conv/pool layer's activations, the first and last conv's filters
  v.seed = 0
  # Each method's own options, passed to its function in convjax.viz.figures as keyword arguments.
  v.filters = ConfigDict()  # figures.filter_patterns (filters.maximize_filters)
  v.filters.num_filters = 64  # filters per layer (8x8 grid)
  v.filters.size = 150  # side of the optimised image
  v.filters.steps = 40
  v.filters.step_size = 1.0  # in pixel units (0-255)
  v.filters.jitter = 0
  v.filters.blur_sigma = 0.0
  v.filters.l2 = 0.0
  v.filters.tv = 0.0
  v.filters.octaves = 1  # > 1: ascend on a smaller image first, upscaling by octave_scale
  v.filters.octave_scale = 1.4
  v.gradcam = ConfigDict()  # figures.gradcam
  v.gradcam.layer = ""  # '' -> the last Conv2D layer
  v.saliency = ConfigDict()  # figures.saliency_maps
  v.saliency.smoothgrad_samples = 25
  v.saliency.smoothgrad_noise = 0.15
  v.saliency.ig_steps = 64
  v.saliency.ig_baseline = 0.0  # a constant pixel value (0: black)
  v.occlusion = ConfigDict()  # figures.occlusion_map
  v.occlusion.patch = 16
  v.occlusion.stride = 8
  v.top_images = ConfigDict()  # figures.top_images
  v.top_images.layer = ""  # '' -> the last Conv2D layer
  v.top_images.filter = 0
  v.top_images.k = 9
  v.top_images.split = "validation"
  return config
