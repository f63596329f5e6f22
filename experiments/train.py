r"""Trains a model from a config file and writes the run to --workdir.

  python -m experiments.train --config=configs/mnist.py --workdir=/tmp/mnist \
      [--config.num_epochs=1 --config.batch_size=64 ...]

Running the same command again resumes from the workdir's latest checkpoint.
"""

from absl import app, flags
from ml_collections import config_flags

from convjax import cli
from convjax.train.loop import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, history, plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)
