"""AdamW with LIFT's schedule, weight-decay mask and (LIFT-only) gradient clipping.

OpenCLIP's recipe, which LIFT keeps: lr 1e-3, betas (0.9, 0.98), eps 1e-6, decoupled weight decay
0.2 on parameters with ndim >= 2 only, linear warmup lr * (step + 1) / warmup, then cosine to 0
over the remaining steps; global-norm clipping at 1.0 for LIFT, none for the CLIP baseline.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax


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


def make_optimizer(optim: Mapping[str, Any], total_steps: int):
  """Returns (optax transformation, schedule)."""
  schedule = lr_schedule(optim["lr"], optim["warmup_steps"], total_steps)
  adamw = optax.adamw(schedule, b1=optim["b1"], b2=optim["b2"], eps=optim["eps"],
                      weight_decay=optim["weight_decay"],
                      mask=lambda p: decay_mask(p, optim.get("wd_min_ndim", 2)))
  clip = optim.get("grad_clip_norm")
  # Same state structure with or without clipping, so a resumed run may switch it.
  clipping = optax.clip_by_global_norm(clip) if clip else optax.identity()
  return optax.chain(clipping, adamw), schedule
