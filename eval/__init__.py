"""Evaluation: SugarCrepe, zero-shot classification and retrieval, in jnp.

Modules: ``texts`` (benchmark file readers) and ``benchmarks`` (config specs, ``required_texts``)
import no JAX, so the embedding job can list the texts a LIFT text bank needs; ``metrics`` (jnp)
with its numpy twin ``reference``; ``predictor`` (sharded embeddings, text banks);
``evaluators`` (one class per benchmark type, ``EvalRunner``); ``main`` (the command line).
Nothing is imported here, so ``import eval.texts`` stays JAX-free.
"""
