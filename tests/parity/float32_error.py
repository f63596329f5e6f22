"""How far convjax's float32 attributions are from the float64 references of the parity
tests (why those tests compute in float64), from the repository root:

  python -m tests.parity.float32_error

Prints, per network and method, the largest difference per image after the parity tests'
normalisation (divided by the reference's largest magnitude).
"""

import jax
import numpy as np

from tests.test_parity import ATTRIBUTIONS, SHAPES, attribution_pair, load_case


def main():
  for name in SHAPES:
    name, model, variables, x, classes, ref = load_case(name)
    variables, x = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), (variables, x))
    for method in [*ATTRIBUTIONS, "feature_ablation", "guided_gradcam"]:
      ours, theirs = attribution_pair((name, model, variables, x, classes, ref), method)
      print(f"{name} {method}: float32 against float64, largest difference {np.abs(ours - theirs).max():.2e}")


if __name__ == "__main__":
  main()
