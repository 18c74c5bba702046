"""Memory and time of `kmask.fused_linear_crossentropy` against `Dense` + the
masked cross-entropy on materialised logits, and whether they agree.

    python benchmarks/fused_linear.py                    # every installed backend
    python benchmarks/fused_linear.py --quick            # small shapes: a smoke test
    python benchmarks/fused_linear.py --backends jax --json bench_fused_linear.json
    python benchmarks/fused_linear.py --vocabulary 262144   # Gemma's vocabulary
    python benchmarks/fused_linear.py --no-padding       # every token real

The loss of the logits `hidden @ kernel + bias` (`tokens = batch * time =
8192`, `hidden = 512`, `vocabulary = 32768` by default; lengths uniform in
`[T/4, T]`, padding labelled -100; every token real with `--no-padding`)
and its gradients with respect to
`hidden`, `kernel` and `bias`, two ways:

- `materialised`: `ops.matmul(hidden, kernel) + bias` (what `Dense` computes)
  into `kmask.MaskedSparseCategoricalCrossentropy(from_logits=True,
  mask_value=-100)`: the `[tokens, vocabulary]` logits and their gradient exist;
- `chunked`: `kmask.fused_linear_crossentropy(..., chunk_size=256)`;
- `chunked+stats`: the same with `class_weight=` (a weight per class) and
  `return_stats=True, temperature=0.7`: every per-step statistic of
  `kmask.fused.HEAD_STATS` (the z-loss term, the arg max, the label's
  log-probability and the entropy) is computed in the chunks and used (a
  negligible multiple of their means is added to the loss, so no compiler
  drops them); it is timed and measured, not compared (its class weights
  change the loss);
- `torch`: on PyTorch, `torch.nn.functional.linear_cross_entropy(...,
  ignore_index=-100, options=LinearCrossEntropyOptions())`, PyTorch's own
  chunked form (2.13), given the kernel as its `[vocabulary, hidden]` view.

From a vocabulary of 131072 the materialised variant is skipped: its logits
and their gradient alone need `2 * 4 * tokens * vocabulary` bytes (16 GiB at
262144), more than a 24 GiB machine holds beside the rest.

Each variant of each backend runs in a process of its own, compiled as
`benchmarks/masked_ce.py` does (`jax.jit`, `tf.function(jit_compile=True)`,
eager PyTorch). After the inputs exist the process resets its peak resident
memory (`VmHWM`), runs one step, and reports the peak (`peak RSS`) and the
peak less the memory held before the step (`step memory`: what the step
itself needs, without the libraries and inputs). On JAX it also reports the
compiled temporary memory (`memory_analysis().temp_size_in_bytes`). Then it
times the step (median of the rounds after the first). The parent compares
the loss and the gradients of the two variants: the largest deviation over
the largest magnitude of the materialised one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _common import (
    backend_info,
    installed_backends,
    machine,
    markdown_table,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    run_child,
    value_and_grad,
    write_json,
)

VARIANTS = ("materialised", "chunked", "chunked+stats", "torch")
# The largest vocabulary at which the materialised variant still runs here.
MATERIALISED_UP_TO = 65536
FULL = {"batch": 8, "time": 1024, "hidden": 512, "vocabulary": 32768}
QUICK = {"batch": 4, "time": 64, "hidden": 32, "vocabulary": 1024}
PAD_LABEL = -100
SEED = 0
OUTPUTS = ("loss", "hidden", "kernel", "bias")


def make_inputs(
    batch: int, time: int, hidden: int, vocabulary: int, padding: bool = True
) -> dict:
    rng = np.random.default_rng(SEED)
    lengths = rng.integers(time // 4, time + 1, batch)
    if not padding:
        lengths[:] = time
    valid = np.arange(time)[None, :] < lengths[:, None]
    labels = np.where(valid, rng.integers(0, vocabulary, (batch, time)), PAD_LABEL)
    return {
        "hidden": rng.standard_normal((batch, time, hidden), dtype=np.float32),
        "kernel": (
            rng.standard_normal((hidden, vocabulary), dtype=np.float32)
            / np.float32(np.sqrt(hidden))
        ),
        "bias": rng.standard_normal(vocabulary, dtype=np.float32) * np.float32(0.1),
        "labels": labels.astype("int32"),
    }


def _loss_fn(variant: str, chunk_size: int, vocabulary: int):
    from keras import ops

    import kmask

    if variant == "torch":
        import torch

        options = torch.nn.LinearCrossEntropyOptions()

        def native(hidden, kernel, bias, labels):
            return torch.nn.functional.linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]),
                kernel.t(),
                labels.reshape(-1).long(),
                linear_bias=bias,
                ignore_index=PAD_LABEL,
                options=options,
            )

        return native
    if variant == "chunked+stats":
        rng = np.random.default_rng(SEED + 1)
        class_weight = rng.uniform(0.5, 2.0, vocabulary).astype("float32")

        def with_stats(hidden, kernel, bias, labels):
            loss, stats = kmask.fused_linear_crossentropy(
                hidden,
                kernel,
                labels,
                bias,
                mask_value=PAD_LABEL,
                chunk_size=chunk_size,
                class_weight=class_weight,
                return_stats=True,
                temperature=0.7,
            )
            used = sum(ops.mean(stat) for stat in stats.values())
            return loss + 1e-12 * used

        return with_stats
    if variant == "chunked":

        def chunked(hidden, kernel, bias, labels):
            return kmask.fused_linear_crossentropy(
                hidden,
                kernel,
                labels,
                bias,
                mask_value=PAD_LABEL,
                chunk_size=chunk_size,
            )

        return chunked
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, mask_value=PAD_LABEL
    )

    def materialised(hidden, kernel, bias, labels):
        return loss(labels, ops.matmul(hidden, kernel) + bias)

    return materialised


def _step(loss_fn, backend: str):
    """`step(hidden, kernel, bias, labels) -> (loss, (d_hidden, d_kernel,
    d_bias))`, compiled as the module docstring says."""
    compiled = value_and_grad(loss_fn, argnums=(0, 1, 2), jit=True, xla=True)

    def step(*inputs):
        outputs = compiled(*inputs)
        if backend == "jax":
            import jax

            jax.block_until_ready(outputs)
        return outputs

    step.compiled = compiled
    return step


def _child(out: Path, variant: str, shape: dict, chunk_size: int, repeats: int):
    import keras
    from keras import ops

    backend = keras.backend.backend()
    arrays = make_inputs(**shape)
    inputs = [ops.convert_to_tensor(arrays[key]) for key in arrays]
    step = _step(_loss_fn(variant, chunk_size, shape["vocabulary"]), backend)
    before = rss_mib()
    reset_peak_rss()
    loss, grads = step(*inputs)
    outputs = [loss, *grads]
    peak = peak_rss_mib()
    saved = Path(tempfile.mkdtemp(prefix="kmask-bench-")) / f"{variant}.npz"
    np.savez(
        saved,
        **{
            name: ops.convert_to_numpy(tensor)
            for name, tensor in zip(OUTPUTS, outputs, strict=True)
        },
    )
    del loss, grads, outputs
    temp = None
    if backend == "jax":
        temp = step.compiled.lower(*inputs).compile().memory_analysis()
        temp = temp.temp_size_in_bytes
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        result = step(*inputs)
        ops.convert_to_numpy(result[0])
        times.append(time.perf_counter() - started)
        del result
    write_json(
        out,
        {
            **backend_info(),
            "variant": variant,
            "rss_before_mib": before,
            "peak_rss_mib": peak,
            "step_mib": peak - before,
            "jax_temp_bytes": temp,
            "times_s": times[1:],
            "median_s": statistics.median(times[1:]),
            "outputs": str(saved),
        },
    )


def _variants(backend: str, shape: dict) -> list[str]:
    """The variants run on `backend` at `shape` (see the module docstring)."""
    variants = ["chunked", "chunked+stats"]
    if shape["vocabulary"] <= MATERIALISED_UP_TO:
        variants.insert(0, "materialised")
    if backend == "torch":
        variants.append("torch")
    return variants


def _ratio_row(
    backend: str, name: str, other: dict, chunked: dict, label: str = "chunked"
) -> list[str]:
    """How much less memory, and what share of the time, `chunked` (the
    variant `label`) takes than the variant `name`."""
    temp = other["jax_temp_bytes"], chunked["jax_temp_bytes"]
    return [
        backend,
        f"{label} vs {name}",
        f"{other['peak_rss_mib'] / chunked['peak_rss_mib']:.1f}x less",
        f"{other['step_mib'] / max(chunked['step_mib'], 1.0):.1f}x less",
        "-" if temp[0] is None else f"{temp[0] / temp[1]:.1f}x less",
        f"{chunked['median_s'] / other['median_s']:.2f}x the time",
    ]


def _relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    scale = max(float(np.abs(reference).max(initial=0.0)), 1e-6)
    return float(np.abs(actual - reference).max(initial=0.0) / scale)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", choices=installed_backends())
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--vocabulary", type=int, help=f"default {FULL['vocabulary']}")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps")
    parser.add_argument(
        "--no-padding", action="store_true", help="every token real (no -100)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = dict(QUICK if args.quick else FULL)
    if args.vocabulary:
        shape["vocabulary"] = args.vocabulary
    if args.no_padding:
        shape["padding"] = False
    chunk_size = min(args.chunk_size, 64) if args.quick else args.chunk_size
    if args.child:
        _child(args.child, args.variant, shape, chunk_size, args.repeats)
        return 0
    forwarded = ["--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats)]
    forwarded += ["--quick"] if args.quick else []
    forwarded += ["--vocabulary", str(args.vocabulary)] if args.vocabulary else []
    forwarded += ["--no-padding"] if args.no_padding else []
    reports: dict[str, dict[str, dict]] = {}
    for backend in args.backends or installed_backends():
        reports[backend] = {
            variant: run_child(
                Path(__file__), backend, [*forwarded, "--variant", variant]
            )
            for variant in _variants(backend, shape)
        }
    rows, match_rows, failed = [], [], False
    for backend, variants in reports.items():
        chunked = variants["chunked"]
        # The chunked variant is compared with the materialised one, or
        # where that does not fit, with PyTorch's own.
        reference = variants.get("materialised", variants.get("torch"))
        for variant, report in variants.items():
            temp = report["jax_temp_bytes"]
            rows.append(
                [
                    backend,
                    variant,
                    f"{report['peak_rss_mib']:.0f}",
                    f"{report['step_mib']:.0f}",
                    "-" if temp is None else f"{temp / 2**20:.0f}",
                    f"{report['median_s']:.2f}",
                ]
            )
        for other in ("materialised", "torch"):
            if other in variants:
                rows.append(_ratio_row(backend, other, variants[other], chunked))
        with_stats = variants["chunked+stats"]
        rows.append(
            _ratio_row(backend, "chunked", chunked, with_stats, "chunked+stats")
        )
        if "materialised" in variants:
            materialised = variants["materialised"]
            rows.append(
                _ratio_row(
                    backend, "materialised", materialised, with_stats, "chunked+stats"
                )
            )
        if reference is not None:
            with (
                np.load(reference["outputs"]) as want,
                np.load(chunked["outputs"]) as got,
            ):
                errors = [_relative_error(got[name], want[name]) for name in OUTPUTS]
            failed |= not all(error <= 1e-5 for error in errors)
            match_rows.append(
                [backend, reference["variant"], *(f"{error:.1e}" for error in errors)]
            )
        for report in variants.values():
            Path(report["outputs"]).unlink()
    sizes = ", ".join(f"{key} {value}" for key, value in shape.items())
    labels = make_inputs(**shape)["labels"]
    sizes += f", {int((labels != PAD_LABEL).sum())} real tokens of {labels.size}"
    print(
        f"\nFused linear cross-entropy, {sizes}, chunk_size {chunk_size} "
        f"({machine()}; "
        + ", ".join(
            f"{b} {v['chunked']['version']} on {v['chunked']['device']}"
            for b, v in reports.items()
        )
        + ")\n"
    )
    headers = ["backend", "variant", "peak RSS MiB", "step MiB", "JAX temp MiB"]
    print(markdown_table([*headers, "time s"], rows))
    print("\nchunked vs the reference variant, relative error (tolerance 1e-5)\n")
    print(markdown_table(["backend", "reference", *OUTPUTS], match_rows))
    write_json(
        args.json,
        {"machine": machine(), "argv": sys.argv, "shape": shape, **reports},
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
