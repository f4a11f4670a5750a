"""AdamW with LIFT's schedule, weight-decay mask and (LIFT-only) gradient clipping.

OpenCLIP's recipe, which LIFT keeps: lr 1e-3, betas (0.9, 0.98), eps 1e-6, decoupled weight decay
0.2 on parameters with ndim >= 2 only, linear warmup lr * (step + 1) / warmup, then cosine to 0
over the remaining steps; global-norm clipping at 1.0 for LIFT, none for the CLIP baseline.

Beyond the paper, for starting from a pretrained tower (regex rules over parameter paths as
:func:`lift_jax.sharding.path_str` writes them, e.g. ``visual/transformer/resblocks/3/ln_1/scale``):

* ``optim.frozen``: parameters matching any rule get a zero update (they stay bit-identical), no
  AdamW state (``optax.MaskedNode`` in place of their moments), and no share of the clipped
  global norm.
* ``optim.lr_multipliers``: ``(regex, factor)`` pairs, first match wins; a parameter's whole AdamW
  update (the weight-decay term included) is scaled by its factor, which is exactly a learning
  rate of ``factor * lr`` for it. The factors hold no state: a run may resume with other
  factors (though not switch from no rules to some, which changes the state's structure).

Without either, the transformation and its state are exactly the paper's.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from lift_jax import cli, config_lib
from lift_jax.sharding import path_str


def lr_schedule(base_lr: float, warmup_steps: int, total_steps: int):
  """step -> learning rate, as OpenCLIP's ``cosine_lr`` (evaluated before each update)."""
  warmup_steps = max(int(warmup_steps), 0)
  decay_steps = max(int(total_steps) - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = base_lr * (step + 1.0) / max(warmup_steps, 1)
    progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    cosine = 0.5 * (1.0 + jnp.cos(math.pi * progress)) * base_lr
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule


def decay_mask(params, min_ndim: int = 2):
  """True where weight decay applies: ndim >= 2 (not LayerNorms, biases, class token, scales)."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= min_ndim, params)


def rules(value) -> list:
  """A config's rule list (tuple, list, or one regex string) as a list."""
  if not value:
    return []
  if isinstance(value, str):
    return [value]
  return list(value)


def frozen_rules(optim: Mapping[str, Any] | None) -> list[str]:
  """The ``optim.frozen`` rules of an optimizer config (none without one)."""
  return rules((optim or {}).get("frozen"))


def frozen_mask(params, frozen: Sequence[str] | str | None):
  """True where a parameter's path matches one of the ``frozen`` regexes."""
  patterns = [re.compile(p) for p in rules(frozen)]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(p.search(path_str(path)) for p in patterns), params)


def lr_factors(params, multipliers) -> Any:
  """A float per parameter: the factor of the first ``(regex, factor)`` rule its path matches, 1.0
  where none does."""
  compiled = []
  for rule in rules(multipliers):
    if isinstance(rule, str) or len(rule) != 2:
      raise cli.ConfigError(f"optim.lr_multipliers entries are (regex, factor) pairs, got "
                            f"{rule!r}")
    compiled.append((re.compile(rule[0]), float(rule[1])))

  def factor(path, _):
    name = path_str(path)
    return next((f for p, f in compiled if p.search(name)), 1.0)

  return jax.tree_util.tree_map_with_path(factor, params)


def freeze_grads(grads, optim: Mapping[str, Any]):
  """Zero gradients for the frozen parameters (no-op without ``optim.frozen``): XLA then drops
  their weight-gradient computations, and the logged gradient norm covers trainable ones only."""
  if not rules(optim.get("frozen")):
    return grads
  mask = frozen_mask(grads, optim.get("frozen"))
  return jax.tree.map(lambda g, m: jnp.zeros_like(g) if m else g, grads, mask)


def _scale_by_factors(multipliers) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    factors = lr_factors(updates, multipliers)
    return jax.tree.map(lambda u, f: u if f == 1.0 else u * jnp.asarray(f, u.dtype),
                        updates, factors), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim: Mapping[str, Any], total_steps: int):
  """Returns (optax transformation, schedule). Fields ``optim`` leaves out take the config
  defaults."""
  optim = config_lib.complete(optim, config_lib.base().optim)
  schedule = lr_schedule(optim["lr"], optim["warmup_steps"], total_steps)
  adamw = optax.adamw(schedule, b1=optim["b1"], b2=optim["b2"], eps=optim["eps"],
                      weight_decay=optim["weight_decay"],
                      mask=lambda p: decay_mask(p, optim["wd_min_ndim"]))
  clip = optim.get("grad_clip_norm")
  # Same state structure with or without clipping, so a resumed run may switch it.
  clipping = optax.clip_by_global_norm(clip) if clip else optax.identity()
  frozen = rules(optim.get("frozen"))
  multipliers = rules(optim.get("lr_multipliers"))
  if multipliers:
    adamw = optax.chain(adamw, _scale_by_factors(multipliers))
  if not frozen:
    return optax.chain(clipping, adamw), schedule

  def labels(params):
    return jax.tree.map(lambda m: "frozen" if m else "trained", frozen_mask(params, frozen))

  def zero_frozen(updates, state, params=None):
    del params
    return freeze_grads(updates, optim), state

  return optax.chain(
      optax.GradientTransformation(lambda params: optax.EmptyState(), zero_frozen),
      clipping,
      optax.multi_transform({"frozen": optax.set_to_zero(), "trained": adamw}, labels),
  ), schedule


def state_bytes(opt_state) -> int:
  """Bytes held by an optimizer state (arrays or ShapeDtypeStructs; masked leaves hold none)."""
  return sum(int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(opt_state) if hasattr(x, "shape"))
