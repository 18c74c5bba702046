"""Memory and time of `kmask.fused_linear_distillation` against the masked
KL of materialised logits, and whether they agree.

    python benchmarks/fused_distillation.py --backends jax          # vocabulary 32768
    python benchmarks/fused_distillation.py --backends jax --vocabulary 262144
    python benchmarks/fused_distillation.py --quick                 # a smoke test

The distillation of a student head `student_hidden @ student_kernel` (hidden
256) from a teacher head (hidden 512) over `tokens = batch * time = 2048`
(lengths uniform in `[T/4, T]`, the padded tokens masked), temperature 2,
and its gradients with respect to the student's hidden states and kernel,
two ways:

- `materialised`: both `[tokens, vocabulary]` logits computed
  (`ops.matmul`), then `kmask.masked_distillation`: they, their softmaxes
  and the student's gradient exist;
- `chunked`: `kmask.fused_linear_distillation(..., chunk_size=256)`.

From a vocabulary of 131072 the materialised variant is skipped (its
arrays alone need several GiB at 262144). Each variant runs in a process of
its own, compiled (`jax.jit`, `tf.function(jit_compile=True)`, eager
PyTorch), and reports its peak resident memory (`peak RSS`), the peak less
the memory held before the step (`step memory`), JAX's compiled temporary
memory, and the median time of the steps after the first, as
`benchmarks/fused_linear.py` does. The shapes are smaller than that
benchmark's (8192 tokens) so that the CPU machine of the project runs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _common import (
    discard_outputs,
    installed_backends,
    machine,
    markdown_table,
    measure_step,
    memory_row,
    run_child,
    value_and_grad,
    write_json,
)

VARIANTS = ("materialised", "chunked")
MATERIALISED_UP_TO = 65536
FULL = {"batch": 4, "time": 512, "student": 256, "teacher": 512, "vocabulary": 32768}
QUICK = {"batch": 2, "time": 64, "student": 16, "teacher": 32, "vocabulary": 1024}
TEMPERATURE = 2.0
SEED = 0
OUTPUTS = ("loss", "hidden", "kernel")


def make_inputs(batch, time, student, teacher, vocabulary) -> dict:
    rng = np.random.default_rng(SEED)
    lengths = rng.integers(time // 4, time + 1, batch)

    def normal(*shape, scale=1.0):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    return {
        "student_hidden": normal(batch, time, student),
        "student_kernel": normal(student, vocabulary, scale=student**-0.5),
        "teacher_hidden": normal(batch, time, teacher),
        "teacher_kernel": normal(teacher, vocabulary, scale=teacher**-0.5),
        "mask": np.arange(time)[None, :] < lengths[:, None],
    }


def _loss_fn(variant: str, chunk_size: int):
    from keras import ops

    import kmask

    if variant == "chunked":

        def chunked(hidden, kernel, teacher_hidden, teacher_kernel, mask):
            return kmask.fused_linear_distillation(
                hidden, kernel, teacher_hidden, teacher_kernel, mask,
                temperature=TEMPERATURE, chunk_size=chunk_size,
            )  # fmt: skip

        return chunked

    def materialised(hidden, kernel, teacher_hidden, teacher_kernel, mask):
        return kmask.masked_distillation(
            ops.matmul(teacher_hidden, teacher_kernel),
            ops.matmul(hidden, kernel),
            mask,
            temperature=TEMPERATURE,
        )

    return materialised


def _child(out: Path, variant: str, shape: dict, chunk_size: int, repeats: int):
    import keras
    from keras import ops

    backend = keras.backend.backend()
    inputs = [ops.convert_to_tensor(array) for array in make_inputs(**shape).values()]
    compiled = value_and_grad(
        _loss_fn(variant, chunk_size), argnums=(0, 1), jit=True, xla=True
    )

    def step(*arguments):
        outputs = compiled(*arguments)
        if backend == "jax":
            import jax

            jax.block_until_ready(outputs)
        return outputs

    jax_compiled = compiled if backend == "jax" else None
    write_json(out, measure_step(step, inputs, variant, OUTPUTS, repeats, jax_compiled))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", choices=installed_backends())
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--vocabulary", type=int, help=f"default {FULL['vocabulary']}")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps")
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = dict(QUICK if args.quick else FULL)
    if args.vocabulary:
        shape["vocabulary"] = args.vocabulary
    chunk_size = min(args.chunk_size, 64) if args.quick else args.chunk_size
    if args.child:
        _child(args.child, args.variant, shape, chunk_size, args.repeats)
        return 0
    forwarded = ["--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats)]
    forwarded += ["--quick"] if args.quick else []
    forwarded += ["--vocabulary", str(args.vocabulary)] if args.vocabulary else []
    variants = list(VARIANTS)
    if shape["vocabulary"] > MATERIALISED_UP_TO:
        variants.remove("materialised")
    rows, match_rows, failed = [], [], False
    reports = {}
    for backend in args.backends or installed_backends():
        found = {
            variant: run_child(
                Path(__file__), backend, [*forwarded, "--variant", variant]
            )
            for variant in variants
        }
        reports[backend] = found
        for variant, report in found.items():
            rows.append(memory_row(backend, variant, report))
        if "materialised" in found:
            with (
                np.load(found["materialised"]["outputs"]) as want,
                np.load(found["chunked"]["outputs"]) as got,
            ):
                errors = [
                    float(
                        np.abs(got[name] - want[name]).max()
                        / max(float(np.abs(want[name]).max()), 1e-6)
                    )
                    for name in OUTPUTS
                ]
            failed |= not all(error <= 1e-5 for error in errors)
            match_rows.append([backend, *(f"{error:.1e}" for error in errors)])
        for report in found.values():
            discard_outputs(report["outputs"])
    sizes = ", ".join(f"{key} {value}" for key, value in shape.items())
    real = int(make_inputs(**shape)["mask"].sum())
    print(
        f"\nFused linear distillation (KL, T={TEMPERATURE:g}), {sizes}, {real} real "
        f"tokens of {shape['batch'] * shape['time']}, chunk_size {chunk_size} "
        f"({machine()})\n"
    )
    headers = ["backend", "variant", "peak RSS MiB", "step MiB", "JAX temp MiB"]
    print(markdown_table([*headers, "time s"], rows))
    if match_rows:
        print("\nchunked vs materialised, relative error (tolerance 1e-5)\n")
        print(markdown_table(["backend", *OUTPUTS], match_rows))
    write_json(args.json, {"machine": machine(), "shape": shape, **reports})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
