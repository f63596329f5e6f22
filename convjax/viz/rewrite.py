"""Attribution rules that change a network's backward pass at its ReLUs (and max pools), on
any model: the model's program (its jaxpr) is evaluated equation by equation with each ReLU
replaced by the rule's function, so a Flax module from anywhere (Linen or NNX, convjax's own
layers or not) gets the rule. No library does this for JAX: captum and pytorch-grad-cam
hook torch modules, and Flax's `intercept_methods` sees module calls, not the `relu`
inside them.

A ReLU is `jax.nn.relu` / `flax.linen.relu` (a `custom_jvp_call` named relu) or a `max` of
a value and zero (`jnp.maximum(x, 0)`). A ReLU inside a loop or branch (scan, while, cond)
is not rewritten: the model is refused with one error, as is a model without any ReLU, whose
rule would silently be the plain gradient.
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from convjax.errors import UserError

_CONTROL_FLOW = ("scan", "while", "cond")


class Rule(NamedTuple):
  """relu(x, reference_input) and, optionally, max_pool(eqn, x, reference_input): the
  replacements (the reference is None unless the rule pairs the input with a baseline)."""

  name: str
  relu: Callable
  max_pool: Optional[Callable] = None


def _is_zero(atom, zeros) -> bool:
  if isinstance(atom, jex.Literal):
    return np.ndim(atom.val) == 0 and float(atom.val) == 0.0
  return atom in zeros


def _relu_input(eqn, zeros) -> Optional[int]:
  """The index of the ReLU's input among eqn's inputs, or None when eqn is no ReLU."""
  name = eqn.primitive.name
  if name == "custom_jvp_call" and eqn.params.get("name") == "relu":
    return 0
  if name == "max" and len(eqn.invars) == 2:
    a, b = (_is_zero(v, zeros) for v in eqn.invars)
    if a != b:
      return 1 if a else 0
  return None


def _zero_vars(eqn, zeros):
  """Tracks the variables that hold a broadcast zero (`jnp.maximum(x, jnp.zeros_like(x))`)."""
  if eqn.primitive.name == "broadcast_in_dim" and _is_zero(eqn.invars[0], zeros):
    zeros.add(eqn.outvars[0])


def _inner(eqn):
  """The single closed sub-program of a call-like equation (jit, custom_jvp/vjp, remat)."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if sub is not None:
      return sub if isinstance(sub, jex.ClosedJaxpr) else jex.ClosedJaxpr(sub, ())
  return None


def _count(jaxpr, pools: bool) -> tuple:
  """(ReLUs the rewrite reaches, names of control-flow primitives that hold one)."""
  zeros, found, blocked = set(), 0, []
  for eqn in jaxpr.eqns:
    _zero_vars(eqn, zeros)
    if _relu_input(eqn, zeros) is not None or (pools and eqn.primitive.name == "reduce_window_max"):
      found += 1
      continue
    subs = list(jex.jaxprs_in_params(eqn.params))
    inner = _inner(eqn)
    if eqn.primitive.name in _CONTROL_FLOW or (inner is None and subs):
      if any(sum(_count(s, pools)[:1]) or _count(s, pools)[1] for s in subs):
        blocked.append(eqn.primitive.name)
    elif inner is not None:
      n, b = _count(inner.jaxpr, pools)
      found, blocked = found + n, blocked + b
  return found, blocked


def _evaluate(jaxpr, consts, args, rule: Rule, refs=None):
  """jaxpr's outputs for args (and, when refs is given, for the reference inputs refs, as a
  second list) with the rule's functions in place of each ReLU and max pool."""
  paired = refs is not None
  env, ref_env, zeros = {}, {}, set()

  def read(e, v):
    return v.val if isinstance(v, jex.Literal) else e[v]

  for v, c in zip(jaxpr.constvars, consts, strict=True):
    env[v] = ref_env[v] = c
  for v, a in zip(jaxpr.invars, args, strict=True):
    env[v] = a
  for v, r in zip(jaxpr.invars, refs or args, strict=True):
    ref_env[v] = r
  for eqn in jaxpr.eqns:
    _zero_vars(eqn, zeros)
    ins = [read(env, v) for v in eqn.invars]
    ref_ins = [read(ref_env, v) for v in eqn.invars] if paired else None
    index = _relu_input(eqn, zeros)
    inner = _inner(eqn)
    if index is not None:
      outs = [rule.relu(ins[index], ref_ins[index] if paired else None)]
      ref_outs = [jax.nn.relu(ref_ins[index])] if paired else None
    elif rule.max_pool is not None and eqn.primitive.name == "reduce_window_max":
      outs = [rule.max_pool(eqn, ins[0], ref_ins[0] if paired else None)]
      ref_outs = bind(eqn, ref_ins) if paired else None
    elif inner is not None and _count(inner.jaxpr, rule.max_pool is not None)[0]:
      outs, ref_outs = _evaluate(inner.jaxpr, inner.consts, ins, rule, ref_ins)
    else:
      outs = bind(eqn, ins)
      ref_outs = bind(eqn, ref_ins) if paired else None
    for v, o in zip(eqn.outvars, outs, strict=True):
      env[v] = o
    for v, o in zip(eqn.outvars, ref_outs or (), strict=paired):
      ref_env[v] = o
  outs = [read(env, v) for v in jaxpr.outvars]
  return outs, ([read(ref_env, v) for v in jaxpr.outvars] if paired else None)


def bind(eqn, ins):
  """eqn's primitive applied to ins, as jax.core.eval_jaxpr does."""
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*ins, **params)
  return outs if eqn.primitive.multiple_results else [outs]


def rewritten(fn: Callable, x, rule: Rule, what: str, reference=None):
  """fn(x) (one array in, one out) with `rule` in place of every ReLU (and max pool, if the
  rule has one); with `reference`, the rule's functions also see the reference input's
  values at the same place. `what` names the model in the error of a model the rule cannot
  rewrite."""
  closed = jax.make_jaxpr(fn)(x)
  found, blocked = _count(closed.jaxpr, False)
  if blocked:
    raise UserError(
      f"{rule.name} rewrites the backward pass of ReLU, and {what} has ReLUs inside "
      f"{', '.join(sorted(set(blocked)))}, which it cannot rewrite"
    )
  if not found:
    raise UserError(
      f"{rule.name} rewrites the backward pass of ReLU, and {what} has no ReLU "
      "(jax.nn.relu or a maximum with zero): its result would be the plain gradient"
    )
  refs = None if reference is None else [jax.lax.stop_gradient(reference)]
  (out,), _ = _evaluate(closed.jaxpr, closed.consts, [x], rule, refs)
  return out


# Guided backprop (Springenberg et al. 2015): only positive gradients pass back, through
# active units.
@jax.custom_vjp
def _guided(x):
  return jax.nn.relu(x)


def _guided_fwd(x):
  return jax.nn.relu(x), x


def _guided_bwd(x, g):
  return (jnp.where((x > 0) & (g > 0), g, 0.0),)


_guided.defvjp(_guided_fwd, _guided_bwd)

GUIDED = Rule("guided backprop", lambda x, _: _guided(x))

# DeepLIFT's rescale rule (Shrikumar et al. 2017) as captum's DeepLift computes it: the
# multiplier of a ReLU is (relu(x) - relu(r)) / (x - r) for the reference input r (the
# gradient where |x - r| < 1e-10); a max pool passes back, at the maxima of x and of r,
# the output's difference over the input's (captum's maxpool rule).
_EPS = 1e-10


@jax.custom_vjp
def _rescale(x, r):
  return jax.nn.relu(x)


def _rescale_fwd(x, r):
  return jax.nn.relu(x), (x, r)


def _rescale_bwd(saved, g):
  x, r = saved
  delta = x - r
  far = jnp.abs(delta) >= _EPS
  multiplier = jnp.where(far, (jax.nn.relu(x) - jax.nn.relu(r)) / jnp.where(far, delta, 1.0), (x > 0).astype(x.dtype))
  return g * multiplier, jnp.zeros_like(r)


_rescale.defvjp(_rescale_fwd, _rescale_bwd)


def _pool_of(eqn):
  return lambda v: bind(eqn, [v])[0]


def _rescale_pool(eqn, x, r):
  pool = _pool_of(eqn)

  @jax.custom_vjp
  def f(x, r):
    return pool(x)

  def fwd(x, r):
    return pool(x), (x, r)

  def bwd(saved, g):
    x, r = saved
    out, to_x = jax.vjp(pool, x)
    out_r, to_r = jax.vjp(pool, r)
    top = jnp.maximum(out, out_r)
    spread = to_x(g * (top - out_r))[0] + to_r(g * (out - top))[0]
    delta = x - r
    far = jnp.abs(delta) >= _EPS
    return jnp.where(far, spread / jnp.where(far, delta, 1.0), to_x(g)[0]), jnp.zeros_like(r)

  f.defvjp(fwd, bwd)
  return f(x, r)


DEEPLIFT = Rule("DeepLIFT", _rescale, _rescale_pool)
