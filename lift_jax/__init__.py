"""lift_jax: LIFT (Language-Image alignment with a Fixed Text encoder) in JAX/Flax.

``lift_jax.load(path)`` returns a trained model (see :func:`lift_jax.checkpoint.load_model`).
Importing the package imports nothing heavy: the PyTorch embedding job uses
``lift_jax.data.records`` without pulling in JAX.
"""

__version__ = "0.1.0"


def load(path: str, dtype: str | None = None):
  """The model of a lift_jax checkpoint (a workdir = its latest step, or one step folder).

  ``model.encode_image(images)`` maps float32 NHWC images, already normalised, to the
  L2-normalised embeddings the loss compares; for CLIP models ``model.encode_text(token_ids)``
  does the same for text. The config is at ``model.config``.
  """
  from lift_jax.checkpoint import load_model  # here: `import lift_jax` must not load JAX

  model, config = load_model(path, dtype=dtype)
  model.config = config
  return model
