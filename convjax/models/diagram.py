"""A model diagram as Keras' `plot_model(show_shapes=True)` draws it: a box per layer with its
name, type and input/output shapes, top to bottom, branches side by side.

The layers are the summary's (`summary.layer_table`, the same names); the arrows come from
the data flow of the model's jaxpr, which no library draws for Flax (flax's tabulate lists
calls, not their connections; Keras' plot_model needs a Keras model and graphviz). Each
equation belongs to the layer whose path heads its name stack; one outside every layer
passes its inputs' flow on (a ReLU, a reshape), unless it merges two or more flows (a
residual add, an Inception concatenation): that one is a box of its own.
"""

from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

from convjax import files  # noqa: E402
from convjax.models.summary import layer_labels, layer_table  # noqa: E402


class Node(NamedTuple):
  name: str
  type_name: str
  input_shapes: tuple  # (None, ...) of each input
  output_shape: tuple


def _shape(aval) -> tuple:
  return (None, *aval.shape[1:])


def layer_graph(model: nn.Module, input_shape: Sequence[int]) -> tuple:
  """(nodes, edges) of `model` on inputs (None, *input_shape): nodes in call order (the first
  is the input), edges (i, j) from node i's output to node j's input."""
  rows = layer_table(model, input_shape)
  labels = dict(zip((r.path for r in rows), layer_labels(rows), strict=True))
  outputs = {r.path: r.output_shape for r in rows}
  types = {r.path: r.type_name for r in rows}
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  nodes = [Node("input", "InputLayer", (), (None, *input_shape))]
  index, inputs, edges = {}, {0: []}, set()
  sources = {id(v): frozenset() for v in closed.jaxpr.invars[:-1]}
  sources[id(closed.jaxpr.invars[-1])] = frozenset({0})
  depth = max(len(p) for p in outputs)

  def owner(name_stack: str):
    parts = tuple(name_stack.split("/")[1:])  # without the root module's class name
    for n in range(min(depth, len(parts)), 0, -1):
      if parts[:n] in outputs:
        return parts[:n]
    return None

  def add_node(node: Node, preds: set, shapes: list) -> int:
    nodes.append(node)
    i = len(nodes) - 1
    edges.update((p, i) for p in preds)
    inputs[i] = shapes
    return i

  for eqn in closed.jaxpr.eqns:
    ins = [(sources.get(id(v), frozenset()), v.aval) for v in eqn.invars]  # literals: no flow
    flows = [s for s, _ in ins if s]
    merged = frozenset().union(*flows) if flows else frozenset()
    path = owner(str(eqn.source_info.name_stack))
    if path is not None:
      if path not in index:
        index[path] = add_node(Node(labels[path], types[path], (), outputs[path]), set(), [])
      me = index[path]
      foreign = [_shape(a) for s, a in ins if s and s != {me}]
      if foreign and not inputs[me]:
        inputs[me] = foreign[:1]
      edges.update((p, me) for p in merged if p != me)
      out = frozenset({me})
    elif len(set(flows)) >= 2 and len(merged) >= 2:  # a merge: a box of its own
      scope = "/".join(str(eqn.source_info.name_stack).split("/")[1:])
      name = f"{scope}/{eqn.primitive.name}" if scope else eqn.primitive.name
      out = frozenset(
        {
          add_node(
            Node(name, eqn.primitive.name.capitalize(), (), _shape(eqn.outvars[0].aval)),
            set(merged),
            [_shape(a) for s, a in ins if s],
          )
        }
      )
    else:
      out = merged
    for v in eqn.outvars:
      sources[id(v)] = out
  nodes = [n._replace(input_shapes=tuple(inputs.get(i, []))) for i, n in enumerate(nodes)]
  return nodes, sorted(edges)


def _text(shapes) -> str:
  return ", ".join(str(s).replace("None,)", "None)") for s in shapes)


def draw(nodes: list, edges: list, path: str, title: str = "") -> None:
  """Writes the diagram as a PNG: rows by depth from the input, branches side by side."""
  rank = {0: 0}
  for i in range(1, len(nodes)):
    preds = [a for a, b in edges if b == i]
    rank[i] = 1 + max((rank[a] for a in preds), default=0)
  rows = {}
  for i in range(len(nodes)):
    rows.setdefault(rank[i], []).append(i)
  box_w, box_h, gap_x, gap_y = 3.4, 0.62, 0.3, 0.45
  widest = max(len(r) for r in rows.values())
  pos = {}
  for r, members in rows.items():
    for k, i in enumerate(members):
      pos[i] = ((k - (len(members) - 1) / 2) * (box_w + gap_x), -r * (box_h + gap_y))
  fig_w = widest * (box_w + gap_x) + 1.2
  fig_h = len(rows) * (box_h + gap_y) + 0.8
  fig, ax = plt.subplots(figsize=(fig_w, fig_h))
  for a, b in edges:
    (xa, ya), (xb, yb) = pos[a], pos[b]
    if rank[b] - rank[a] > 1 and abs(xa - xb) < box_w / 2:  # a skip past boxes below: around them
      bulge = 0.9 / (ya - yb)
      ax.annotate(
        "",
        xy=(xb + box_w / 2, yb),
        xytext=(xa + box_w / 2, ya),
        arrowprops=dict(
          arrowstyle="-|>", color="0.35", lw=0.8, shrinkA=0, shrinkB=0, connectionstyle=f"arc3,rad={-bulge:.4f}"
        ),
      )
      continue
    ax.annotate(
      "",
      xy=(xb, yb + box_h / 2),
      xytext=(xa, ya - box_h / 2),
      arrowprops=dict(arrowstyle="-|>", color="0.35", lw=0.8, shrinkA=0, shrinkB=0),
    )
  for i, node in enumerate(nodes):
    x, y = pos[i]
    ax.add_patch(
      FancyBboxPatch(
        (x - box_w / 2, y - box_h / 2),
        box_w,
        box_h,
        boxstyle="round,pad=0.02",
        facecolor="#eaf1fb" if node.type_name != "InputLayer" else "#f4f4f4",
        edgecolor="0.3",
        lw=0.8,
      )
    )
    shapes = (
      f"input: {_text(node.input_shapes)}\noutput: {_text([node.output_shape])}"
      if node.input_shapes
      else f"output: {_text([node.output_shape])}"
    )
    ax.text(x, y + 0.13, f"{node.name} ({node.type_name})", ha="center", va="center", fontsize=7.5, weight="bold")
    ax.text(x, y - 0.12, shapes, ha="center", va="center", fontsize=6.5, linespacing=1.1)
  half = widest * (box_w + gap_x) / 2
  ax.set_xlim(-half - 0.3, half + 0.9)  # room on the right for skips
  ax.set_ylim(-(len(rows) - 1) * (box_h + gap_y) - box_h, box_h)
  ax.axis("off")
  if title:
    ax.set_title(title, fontsize=10)
  fig.subplots_adjust(left=0, right=1, top=1 - 0.4 / fig_h, bottom=0)
  files.save_figure(fig, path, dpi=90)


def plot_model(model: nn.Module, input_shape: Sequence[int], path: str, name: str = "") -> list:
  """Writes `model`'s diagram for inputs (None, *input_shape) to `path`; returns its nodes."""
  nodes, edges = layer_graph(model, input_shape)
  draw(nodes, edges, path, name)
  return nodes
