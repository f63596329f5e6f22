"""The XLA:CPU setting convjax applies before JAX starts its backend.

jaxlib 0.10 hands CPU convolutions (and some reductions) to YNNPACK by default.
For the small-channel convolutions of these convnets, and above all their weight
gradients, XLA's own (Eigen) convolutions are faster on x86: the MNIST convnet's
train step at batch 128 on 2 cores goes from ~44 ms to ~17 ms (BENCHMARKS.md).
`--xla_cpu_experimental_ynn_fusion_type=dot` keeps YNNPACK for dots only.

The flag is experimental, and an XLA that doesn't know a flag aborts, so it is
added only for the jaxlib versions it was measured on, only when XLA_FLAGS
doesn't already set it, and never when CONVJAX_XLA_DEFAULTS=0. It only matters
on CPU; the benchmark records the XLA_FLAGS in force.
"""

import importlib.metadata
import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
VALUE = "dot"
MEASURED_JAXLIB = ((0, 10),)  # (major, minor) series the flag was measured on


def _series(version: str) -> tuple:
  parts = version.split(".")
  try:
    return int(parts[0]), int(parts[1])
  except (IndexError, ValueError):
    return ()


def apply(environ=os.environ) -> bool:
  """Adds FLAG=VALUE to XLA_FLAGS when it applies (see the module doc); True if it did."""
  if environ.get("CONVJAX_XLA_DEFAULTS", "1") == "0":
    return False
  flags = environ.get("XLA_FLAGS", "")
  if FLAG in flags:
    return False
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return False
  if _series(version) not in MEASURED_JAXLIB:
    return False
  environ["XLA_FLAGS"] = f"{flags} {FLAG}={VALUE}".strip()
  return True
