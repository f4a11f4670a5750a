"""Measure the cost of a config: train step, input pipeline, embedding job, evaluation.

    python -m lift_jax.tools.bench --config=configs/vitb16_datacomp.py --mode=step
    python -m lift_jax.tools.bench --config=configs/tiny_synthetic.py --mode=input --workers=0,1,2
    python -m lift_jax.tools.bench --mode=efficiency            # LIFT vs CLIP FLOPs / memory table
    python -m lift_jax.tools.bench --config=... --mode=embed --texts=captions.txt
    python -m lift_jax.tools.bench --config=... --mode=eval
    python -m lift_jax.tools.bench --mode=suite --budget_s=420 --output=DIR   # all of it, on a GPU

One module per mode (``step``, ``efficiency``, ``inputs``, ``embedding``, ``evaluation``,
``suite``); ``common`` holds the flags and the output helpers, ``__main__`` the command line.

Every mode prints a table and writes JSON (``--output``, default ``bench-<mode>.json``) with the
device it ran on. Times are medians of timed repetitions after warm-up, blocking on the results.

* step: the jitted train step on random on-device data. Compile time, step time, img/s,
  img/s/device, FLOPs per step from XLA's cost analysis of the compiled program, MFU against the
  device's dense bf16 peak, peak device memory (allocator statistics on GPU/TPU; on CPU the
  compiled program's memory analysis: arguments + outputs + temporaries - aliased).
* efficiency: compiles (does not run) the train step of LIFT and of CLIP with caption lengths
  32/77/128/323 at the same per-device batch, and tabulates FLOPs and memory per step. A CPU is
  enough.
* input: the grain pipeline of the config (decode + random resized crop; normalisation runs on the
  accelerator) with several worker counts, and the bare per-core decode + crop + normalise rate.
* suite: the measurements that matter for an accelerator, in order of value, each row in its own
  process, within ``--budget_s``; see :func:`run_suite`.
"""
