"""Evaluation: SugarCrepe, zero-shot classification and retrieval, in jnp.

Modules: ``texts`` (benchmark file readers) and the ``benchmarks`` package (one module per
benchmark type: its config fields, reader and evaluator; ``required_texts``) import no JAX, so the
embedding job can list the texts a LIFT text bank needs; ``metrics`` (jnp) with its numpy twin
``reference``; ``predictor`` (sharded embeddings, text banks); ``runner`` (the evaluators of a
config, what the trainer calls); ``main`` (the command line). Nothing is imported here, so
``import eval.texts`` stays JAX-free.
"""
