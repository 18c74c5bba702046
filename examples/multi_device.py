"""Two devices, or accumulated micro-batches, give the same step as the whole batch.

The README's table "Multiple devices and gradient accumulation": for every
installed backend, a masked linear model trained with SGD in each setup
(one device; 2 devices or 2 processes; `gradient_accumulation_steps` 2 and 4;
MultiWorkerMirroredStrategy on TensorFlow; a data x model mesh on JAX), with
Keras's built-in `mse` and with kmask, against a NumPy full-batch SGD run.
The first half of the batch holds long sequences and the second half short
ones, so a per-device or per-micro-batch mean is visibly off.

The training code of each setup lives in `kmask/parity_devices.py`
(`fit`, `_torch_ddp`, `_tensorflow_workers`): it is the code a user writes,
with a kmask loss in place of the built-in one and nothing else changed.
Accumulation is the one setup that needs more, `kmask.accumulation_weights`:

    loss = kmask.MaskedMeanSquaredError(reduction="sum")
    weights = kmask.accumulation_weights(mask, batch_size=2, steps=4)
    model.compile(optimizer=SGD(0.1, gradient_accumulation_steps=4), loss=loss)
    model.fit(x, y, sample_weight=weights, batch_size=2, shuffle=False)

    python examples/multi_device.py                  # every installed backend
    python examples/multi_device.py --backends torch --json gaps.json
"""

from __future__ import annotations

import sys

from kmask.parity_devices import main

if __name__ == "__main__":
    sys.exit(main())
