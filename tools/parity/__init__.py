"""`python -m tools.parity`: the same numbers on TensorFlow, JAX and PyTorch.

Run it where the backends are installed (`nox -s parity` installs all three,
runs it, then its tests):

    python -m tools.parity                         # every installed backend
    python -m tools.parity --json parity.json      # and write the full results
    python -m tools.parity --backends jax torch --cases scce_logits/ layer/
    python -m tools.parity --list                  # the case names, nothing run

The parent process builds one fixed suite of cases from `SEED` with NumPy and
writes their inputs to a temporary `.npz`. Each backend then runs the whole
suite in a child process of its own (`sys.executable -m tools.parity`, the
parent's environment with only `KERAS_BACKEND` changed) and calls the public
API as a user does: a kmask loss as Keras calls it,
`loss(y_true, y_pred, sample_weight)`, with a propagated mask put on `y_pred`
by `keras.layers.Masking`; `kmask.masked_loss` for explicit masks; metrics
through `update_state`/`result` over two batches; layers in front of a loss.
It records each loss value and its gradient with respect to `y_pred` (the
backend's autodiff), on whatever device the backend sees. The parent compares
every output with a float64 NumPy reference and every backend with every
other, prints a table (one row per case; per backend the worst error against
NumPy, then the worst backend-to-backend gap) and exits with status 1, naming
the case, the backend and both values, when any output is off tolerance.

How far off is an output `x` from a reference `r` (`relative_error`)?
`max_i |x_i - r_i| / max(max_i |r_i|, ERROR_FLOOR)`: the largest deviation
against the largest reference magnitude, so a scalar gets its relative error,
with an absolute floor of `ERROR_FLOOR` = 1e-6 for values near 0. NaN must
meet NaN. The reference is first rounded to the dtype the backend returned the
output in: a bfloat16 gradient keeps 8 significant bits, and its own rounding
(up to 2**-8 = 3.9e-3 relative) is no error of the computation; against the
unrounded reference bfloat16 gradients show up to 3.5e-3, float16 ones 4.6e-4.
The gap between two backends is the same measure with the other backend in
place of `r` (scaled by the reference). Both must stay within
`TOLERANCES[dtype]`, `dtype` being the precision of the case's inputs.

The suite is a covering design, not the full product: every loss with every
reduction, every loss with every mask source that applies to its targets,
every mask source with every reduction (`suite.py`); every loss in
float16 and bfloat16; every loss on all-padding, no-padding and one-token
batches; every loss compiled (`jax.jit`, `tf.function`; torch runs eagerly);
then the metrics, the layers, and the fused cross-entropy of `kmask.fused`
(its gradients with respect to the logits, or to the hidden states, kernel
and bias of the chunked linear one). The `devices/` cases check devices as
well as backends: a few SGD steps of a masked model on one device, on two
(TensorFlow `MirroredStrategy` on 2 logical CPUs, JAX `DataParallel` on 2 CPU
devices, PyTorch DDP in 2 `gloo` processes) and with gradient accumulation,
each against NumPy's full-batch weights and, per backend, the two-device
weights against the one-device ones (`tools/parity/devices/`; each
backend's child runs them in a process of its own with 2 devices set up).
A case's inputs come from a generator seeded with `SEED` and its name, so
they do not depend on which cases run.

One module per job:

- `references.py`: the float64 NumPy references (per-step losses and their
  gradients, the reductions, the fused linear cross-entropy, full-batch SGD),
  which `tests/` imports too;
- `losses.py`: the losses under test, as a user configures them;
- `sources.py`: the clean batches and the mask sources that pad them;
- `cases.py`: `Case`, and a builder per runner that pairs inputs with NumPy;
- `sequences.py`: the masked CTC, packed-sequence and whole-sequence accuracy
  cases with their NumPy references (a CTC that enumerates every path);
- `suite.py`: the families of cases and `build_suite`;
- `runner.py`: the child, one backend calling the public API;
- `compare.py`: `relative_error` and the comparison of every output;
- `report.py`: the table, the summary and the JSON;
- `__main__.py`: the command line and one child process per backend;
- `devices/`: the device setups (`python -m tools.parity.devices`).

To add cases, write a function in `suite.py` that returns a list of `Case`s
and decorate it with `@_family`; `loss_case`, `metric_case`, `layer_case` and
`fused_case` of `cases.py` build a case and its NumPy reference. A new way of
calling the API is a runner in `runner.RUNNERS`: `(spec, inputs) -> outputs`,
run in the child.
"""
