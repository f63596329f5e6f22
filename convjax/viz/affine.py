"""A model's program cut where it stops being affine in its input: `split(fn, x)` gives
`head` (the affine start: a first convolution or dense layer and its bias, a rescaling, a
reshape) and `rest` (everything after it), found equation by equation in the program's
jaxpr, so any model (Linen or NNX, convjax's or a researcher's) is cut the same way.

Methods that sum the gradients of many points use it to run the head's costly parts once
rather than once a point, exactly (the head is affine):
- along a straight path b + a (x - b), the head's output is head(b) + a (head(x) - head(b)),
  so Integrated Gradients evaluates the head twice, not once a point;
- a sum of input gradients is the head's transpose applied once to the sum of the
  gradients at its output (`pull`), so Integrated Gradients and SmoothGrad run the head's
  backward pass once, not once a point.
For the MNIST convnet the head is its one-channel first convolution, which XLA:CPU runs at
a small fraction of its speed on the later layers (BENCHMARKS.md).

An equation is in the head when every input that depends on x comes from the head and it
is linear in those inputs (a sum, a product or quotient by something not depending on x, a
convolution or dot with fixed weights, a reshape, slice, pad, transpose or widening cast);
anything else starts the rest, a call into a sub-program (a custom derivative, a loop)
included; calls of jitted functions are inlined first. A program whose first
operation on x is not affine has an empty head (the identity), and the methods compute
what they did without it.
"""

from typing import Callable, NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp

from convjax.models import layers as model_layers
from convjax.viz.rewrite import bind

# Linear in each input that depends on x, whichever they are.
_LINEAR = frozenset(
  (
    "add",
    "add_any",
    "sub",
    "neg",
    "reshape",
    "transpose",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "reduce_sum",
    "slice",
    "concatenate",
    "stack",
    "split",
    "cumsum",
    "rev",
    "copy",
    "copy_p",
  )
)
# Linear in their first input when only it depends on x (a divisor, a kernel, a padding
# value or slice index that depends on x is not).
_LINEAR_IN_FIRST = frozenset(("div", "conv_general_dilated", "pad", "dynamic_slice"))
# Linear when exactly one of the two inputs depends on x.
_LINEAR_IN_ONE = frozenset(("mul", "dot_general"))


def _affine(eqn, depends: list) -> bool:
  name = eqn.primitive.name
  if name in _LINEAR:
    return True
  if name in _LINEAR_IN_FIRST:
    return depends[0] and not any(depends[1:])
  if name in _LINEAR_IN_ONE:
    return sum(depends) == 1
  if name == "convert_element_type":  # a widening cast only: a narrowing one rounds
    old, new = eqn.invars[0].aval.dtype, eqn.params["new_dtype"]
    floats = jnp.issubdtype(old, jnp.floating) and jnp.issubdtype(new, jnp.floating)
    return floats and jnp.finfo(new).bits >= jnp.finfo(old).bits
  return False


class Split(NamedTuple):
  """fn == rest(head(x)); head's outputs are a tuple of arrays (the values the rest reads)."""

  head: Callable
  rest: Callable
  pull: Callable  # pull(x, cotangents of head's outputs) -> the cotangent of x (head's transpose)


def _is_var(v) -> bool:
  return not isinstance(v, jex.Literal)


def split(fn: Callable, x) -> Split:
  """fn (one array in, one out) cut after its affine start (see the module doc), traced
  at x's shape and dtype."""
  # Jitted helpers (jnp.pad, jnp.stack) inlined, so that their operations are seen; convjax's
  # first convolutions as XLA's, not as the custom derivative they are inside
  # models.layers.narrow_convs(), which would end the head (the head runs once a batch).
  with jax.disable_jit(), model_layers.narrow_convs(False):
    closed = jax.make_jaxpr(fn)(x)
  jaxpr = closed.jaxpr
  head_vars, rest_vars, parts = {jaxpr.invars[0]}, set(), []
  for eqn in jaxpr.eqns:
    depends = [_is_var(v) and (v in head_vars or v in rest_vars) for v in eqn.invars]
    if any(_is_var(v) and v in rest_vars for v in eqn.invars):
      part = "rest"
    elif not any(depends):
      part = "fixed"  # depends on no input: evaluated wherever it is read
    else:
      part = "head" if _affine(eqn, depends) else "rest"
    parts.append(part)
    {"head": head_vars, "rest": rest_vars, "fixed": set()}[part].update(eqn.outvars)
  read_by_rest = [v for eqn, part in zip(jaxpr.eqns, parts, strict=True) if part == "rest" for v in eqn.invars]
  cut = list(dict.fromkeys(v for v in [*read_by_rest, *jaxpr.outvars] if _is_var(v) and v in head_vars))

  def evaluate(inputs: dict, run: tuple, outputs: list):
    env = dict(zip(jaxpr.constvars, closed.consts, strict=True)) | inputs
    for eqn, part in zip(jaxpr.eqns, parts, strict=True):
      if part in run:
        env.update(zip(eqn.outvars, bind(eqn, [v.val if not _is_var(v) else env[v] for v in eqn.invars]), strict=True))
    return [v.val if not _is_var(v) else env[v] for v in outputs]

  def head(v):
    return tuple(evaluate({jaxpr.invars[0]: v}, ("fixed", "head"), cut))

  def rest(values):
    return evaluate(dict(zip(cut, values, strict=True)), ("fixed", "rest"), jaxpr.outvars)[0]

  def pull(v, cotangents):
    return jax.vjp(head, v)[1](tuple(cotangents))[0]

  return Split(head, rest, pull)
