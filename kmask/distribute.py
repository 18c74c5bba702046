"""Global token counts across replicas: the only backend-aware module.

A token mean must divide by the real tokens of the whole global batch, not by
each replica's own. How replicas combine gradients differs per backend, so the
denominator each replica uses differs too:

- TensorFlow under `tf.distribute` (`MirroredStrategy`,
  `MultiWorkerMirroredStrategy`): Keras sums the replicas' gradients, so each
  replica divides by the sum of every replica's count.
- PyTorch under `torch.distributed` with `DistributedDataParallel`: DDP
  averages the gradients, so each process divides by that sum / world size.
- JAX under `keras.distribution.DataParallel`: the loss sees the global
  array, so the count is already global and is used as it is.

With these, one step on N replicas equals one step on one device with the
whole batch. On PyTorch the count is all-reduced whenever a process group of
more than one process is initialized, so every process must call the loss the
same number of times (as a DDP training loop does); wrap code that calls a
loss on one process only (say, rank-0 evaluation) in `kmask.distribute.local()`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import keras

from kmask.typing import Tensor

_state = threading.local()


def global_denominator(local: Any) -> Tensor:
    """The denominator that makes the replicas' combined gradient exact.

    Args:
        local: This replica's denominator (a token count or a sum of
            weights), a scalar tensor.

    Returns:
        The denominator to divide this replica's sum by (see the module
        docstring), `local` itself outside a multi-replica run.
    """
    if getattr(_state, "local_only", False):
        return local
    return _replica_denominator(local)


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within this context, losses divide by this replica's own count.

    Example:

    >>> import kmask
    >>> with kmask.distribute.local():
    ...     float(kmask.masked_reduce([[1.0, 3.0]]))
    2.0
    """
    previous = getattr(_state, "local_only", False)
    _state.local_only = True
    try:
        yield
    finally:
        _state.local_only = previous


def _replica_denominator(local):
    """The denominator from every replica's, as this backend combines them."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tensorflow_replica_sum(local)
    if backend == "torch":
        return _torch_process_mean(local)
    return local


def _tensorflow_replica_sum(local):
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return local
    return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(local))


def _torch_process_mean(local):
    import torch.distributed as dist

    # Not `dist.is_available()`: `torch.compile` cannot trace a torch function
    # that returns a bool; a build without distributed has no `is_initialized`.
    is_initialized = getattr(dist, "is_initialized", None)
    if is_initialized is None or not is_initialized():
        return local
    world_size = dist.get_world_size()
    if world_size == 1:
        return local
    total = local.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / world_size
