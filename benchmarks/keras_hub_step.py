"""Memory and time of one training step of a keras-hub `GemmaCausalLM` at
Gemma's vocabulary: keras-hub's default `compile()` against the same task
wrapped by `kmask.keras_hub.fused_causal_lm`.

    KERAS_BACKEND=jax python benchmarks/keras_hub_step.py
    KERAS_BACKEND=jax python benchmarks/keras_hub_step.py --vocabulary 4096  # quick

A 1-layer `GemmaBackbone` (hidden 64, soft cap 30, random weights, no
download) and `batch x time = 4 x 256` preprocessed tokens, the last quarter
of each sequence padding (`sample_weight` 0), run by each variant in a
process of its own, under the current KERAS_BACKEND, compiled as
`compile()` does by default:

- `keras-hub compile()`: the task with keras-hub's defaults (Adam(2e-5),
  `SparseCategoricalCrossentropy(from_logits=True)`, `sum_over_batch_size`),
  which holds the `[batch, time, vocabulary]` logits and their gradient;
- `kmask fused_causal_lm`: the wrapped task, the head in chunks of 256.

After the model, its optimizer and the batch exist, the process resets its
peak resident memory (`VmHWM`), runs one step (which compiles) and
`repeats` more, and reports the peak (`peak RSS`), the peak less the memory
held before the first step (`step memory`: the step's buffers, and the
compiler's, alike in both variants), and the median time of the repeats.

keras-hub: `pip install -c constraints.txt --no-deps keras-hub regex
tokenizers`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from _common import (
    backend_info,
    machine,
    markdown_table,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    run_child,
)

VARIANTS = ("keras-hub compile()", "kmask fused_causal_lm")
BATCH, STEPS, HIDDEN, SOFTCAP = 4, 256, 64, 30.0


def _child(out: Path, variant: str, vocabulary: int, repeats: int) -> None:
    import keras
    import keras_hub
    import numpy as np

    import kmask.keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=vocabulary,
        num_layers=1,
        num_query_heads=1,
        num_key_value_heads=1,
        hidden_dim=HIDDEN,
        intermediate_dim=2 * HIDDEN,
        head_dim=HIDDEN,
        final_logit_soft_cap=SOFTCAP,
    )
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    if variant == VARIANTS[1]:
        model = kmask.keras_hub.fused_causal_lm(model, chunk_size=256)
    rng = np.random.default_rng(0)
    real = np.arange(STEPS)[None, :] < np.full((BATCH, 1), 3 * STEPS // 4)
    x = {
        "token_ids": rng.integers(1, vocabulary, (BATCH, STEPS)).astype("int32"),
        "padding_mask": real,
    }
    labels = rng.integers(1, vocabulary, (BATCH, STEPS)).astype("int32")
    weights = real.astype("float32")

    def step() -> float:
        logs = keras.Model.train_on_batch(
            model, x, labels, sample_weight=weights, return_dict=True
        )
        return float(logs["loss"])

    before = rss_mib()
    reset_peak_rss()
    step()  # compiles; JAX and XLA keep what it allocated for the next ones
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        loss = step()
        seconds.append(time.perf_counter() - started)
    peak = peak_rss_mib()
    out.write_text(
        json.dumps(
            {
                "peak_rss_mib": peak,
                "step_mib": peak - before,
                "seconds": statistics.median(seconds),
                "loss": loss,
                "info": backend_info(),
            }
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabulary", type=int, default=262144)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.variant, args.vocabulary, args.repeats)
        return 0
    import os

    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    script = Path(__file__).resolve()
    options = ["--vocabulary", str(args.vocabulary), "--repeats", str(args.repeats)]
    results = {
        variant: run_child(script, backend, [*options, "--variant", variant])
        for variant in VARIANTS
    }
    info = next(iter(results.values()))["info"]
    logits_mib = BATCH * STEPS * args.vocabulary * 4 / 2**20
    print(
        f"\nOne training step of a 1-layer keras-hub GemmaCausalLM, batch x time "
        f"{BATCH} x {STEPS} (a quarter padding), hidden {HIDDEN}, vocabulary "
        f"{args.vocabulary}: {info['backend']} {info['version']}, Keras "
        f"{info['keras']}, {info['device']} ({machine()}). The float32 logits "
        f"alone: {logits_mib:.0f} MiB.\n"
    )
    rows = [
        (
            variant,
            f"{result['peak_rss_mib']:.0f}",
            f"{result['step_mib']:.0f}",
            f"{result['seconds']:.2f}",
            f"{result['loss']:.4f}",
        )
        for variant, result in results.items()
    ]
    headers = ("variant", "peak RSS MiB", "step memory MiB", "step s", "loss")
    print(markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
