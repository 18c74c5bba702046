"""Device cases of the parity suite: one device against two, on every backend.

A token mean must divide by the real tokens of the whole global batch. Here the
first half of every batch holds long sequences and the second half short ones,
so a per-device (or per-micro-batch) mean is visibly off. For one backend
(`KERAS_BACKEND`) this trains a masked linear model with SGD in each setup,
with kmask's `MaskedMeanSquaredError` and, for comparison, Keras's built-in
`mse`, and measures the weights after 1 and after 3 steps against a NumPy
SGD run on the whole batch, and against the same kmask run on one device:

- `one_device`: `fit()` on one device, the whole batch at once;
- `two_devices`: TensorFlow `tf.distribute.MirroredStrategy` on 2 logical
  CPUs and JAX `keras.distribution.DataParallel` on 2 CPU devices, both with
  `fit()`; PyTorch `DistributedDataParallel` in 2 `gloo` processes with a
  custom loop (Keras's torch `fit()` runs on one device);
- `accumulation_2`, `accumulation_4`: the optimizer's
  `gradient_accumulation_steps`, with `kmask.accumulation_weights` and
  `reduction="sum"`;
- `two_workers` (TensorFlow only): `tf.distribute.MultiWorkerMirroredStrategy`
  over 2 worker processes on localhost, with a custom loop (`strategy.run`):
  Keras 3.15.1's `fit()` itself fails under that strategy (keras-team/keras
  issue 20585) before any loss runs;
- `data_and_model_axes` (JAX only): `keras.distribution.ModelParallel` on a
  `(batch 2, model 1)` mesh.

The mask comes from each of two sources: a propagated mask
(`keras.layers.Masking`) and `mask_value=NaN` in the targets. The loss Keras
logs is checked against the NumPy global token mean.

The training code of each setup is what a user writes; no kmask call in it
knows how many devices there are.

    python -m tools.parity.devices                    # every installed backend
    python -m tools.parity.devices --backends torch --json gaps.json

`python -m tools.parity` runs the first four setups as its `devices/` cases;
this command prints the README's table from these rows. The modules: `data`
(data, setups, NumPy expectations), `training` (`fit` in each setup),
`processes` (the two-process setups), `rows` (a backend's rows, its worker
process, the table), `__main__` (the command line).
"""
