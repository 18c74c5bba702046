"""Which passes over the logits the masked sparse cross-entropy makes,
forward + backward, against the floor (one `exp` pass writing a new array
the size of the logits).

    python benchmarks/floor_profile.py                    # every installed backend
    python benchmarks/floor_profile.py --backends jax --shape 16 256 4096

Each backend runs in a child process of its own, on `[batch, time, classes]`
float32 logits (`[16, 256, 4096]` by default) with lengths uniform in
`[T/4, T]`, the step of `benchmarks/masked_ce.py` (`kmask`: value and
gradient of `MaskedSparseCategoricalCrossentropy(mask_value=0,
from_logits=True)`; `native`: the backend's own masked loss; `floor`:
`keras.ops.exp(logits)`):

- JAX and TensorFlow: the optimised HLO of the compiled step (`jax.jit`;
  `tf.function(jit_compile=True)`, `experimental_get_compiler_ir`). One row
  per top-level instruction that reads or writes a logits-sized array: how
  many it reads (`gather` where it only gathers one logit per row) and
  writes, and how many `exponential`s over the logits its fused computation
  holds.
- PyTorch (eager): `torch.profiler`, one row per operator that touches a
  logits-sized tensor and takes 0.1 ms or more, with its calls and CPU
  time over 3 steps.

A pass that reads the logits and writes an array of their size is what the
floor does once; every further row is a pass the floor does not make.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _common import installed_backends, markdown_table, run_child, write_json
from masked_ce import floor_step, make_inputs, native_loss, value_and_grad_step

VARIANTS = ("kmask", "native", "floor")
# Instructions that move no data of their own.
_FREE = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? (\S+?)\((.*)")


def _shape_elements(shape: str) -> int:
    dims = re.fullmatch(r"\w+\[([0-9,]*)\]", shape)
    if dims is None:
        return 0
    return int(np.prod([int(d) for d in dims.group(1).split(",") if d]))


def hlo_passes(text: str, elements: int) -> list[dict]:
    """The ENTRY instructions of an optimised HLO module that read or write
    an array of `elements` elements, with the `exponential`s of that size
    in the computation each one calls."""
    shapes, computations, current = {}, {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            current = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            current = current.lstrip("%")
            computations[current] = []
            if line.startswith("ENTRY"):
                computations["ENTRY"] = computations[current]
            continue
        found = _INSTRUCTION.match(line)
        if found and current is not None:
            name, shape, opcode, rest = found.groups()
            shapes[name] = shape
            computations[current].append((name, shape, opcode, rest))
    passes = []
    for name, shape, opcode, rest in computations.get("ENTRY", []):
        if opcode in _FREE:
            continue
        operands = re.findall(r"%([\w.\-]+)", rest.split("),")[0])
        reads = sum(_shape_elements(shapes.get(o, "")) == elements for o in operands)
        writes = int(_shape_elements(shape) == elements)
        called = re.search(r"calls=%([\w.\-]+)", rest)
        body = computations.get(called.group(1), []) if called else []
        exps = sum(
            op == "exponential" and _shape_elements(s) == elements
            for _, s, op, _ in body
        )
        kinds = {op for _, _, op, _ in body}
        if reads or writes:
            origin = re.search(r'op_name="([^"]*)"', rest)
            passes.append(
                {
                    "instruction": f"{opcode} {name}",
                    "reads": reads,
                    "writes": writes,
                    "exps": exps,
                    # A gather reads one logit per row, not the logits.
                    "gather": "gather" in kinds or opcode == "gather",
                    "op": origin.group(1).split("/")[-1] if origin else "",
                }
            )
    return passes


def _losses(backend: str) -> dict:
    """`{variant: loss(x, y, valid)}` of kmask and the native loss."""
    import kmask

    masked = kmask.MaskedSparseCategoricalCrossentropy(mask_value=0, from_logits=True)
    return {
        "kmask": lambda x, y, valid: masked(y, x),
        "native": native_loss(backend, "sparse"),
    }


def _child(out: Path, shape: tuple[int, int, int]) -> None:
    import keras
    from keras import ops

    backend = keras.backend.backend()
    arrays = make_inputs("sparse", shape)
    inputs = [ops.convert_to_tensor(arrays[key]) for key in arrays]
    losses = _losses(backend)
    elements = int(np.prod(shape))
    report: dict = {"backend": backend, "shape": list(shape), "variants": {}}
    if backend in ("jax", "tensorflow"):
        for variant in VARIANTS:
            if variant == "floor":
                fn = ops.exp
                args = inputs[:1]
            else:
                fn = value_and_grad_step(losses[variant], backend).compiled
                args = inputs
            if backend == "jax":
                import jax

                text = jax.jit(fn).lower(*args).compile().as_text()
            else:
                import tensorflow as tf

                compiled = tf.function(fn, jit_compile=True)
                if variant != "floor":
                    compiled = fn  # a tf.function(jit_compile=True) already
                text = compiled.experimental_get_compiler_ir(*args)(
                    stage="optimized_hlo"
                )
            report["variants"][variant] = hlo_passes(text, elements)
    else:
        from torch.profiler import ProfilerActivity, profile

        steps = {v: value_and_grad_step(losses[v], backend) for v in losses}
        steps["floor"] = floor_step(backend)
        for variant, step in steps.items():
            step(*inputs)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(3):
                    step(*inputs)
            rows: dict[str, dict] = {}
            for event in prof.events():
                sizes = [int(np.prod(s)) for s in event.input_shapes if s]
                if elements not in sizes or event.self_cpu_time_total < 100:
                    continue
                row = rows.setdefault(event.name, {"calls": 0, "cpu_ms": 0.0})
                row["calls"] += 1
                row["cpu_ms"] += event.self_cpu_time_total / 1e3
            report["variants"][variant] = [
                {"instruction": name, **row}
                for name, row in sorted(rows.items(), key=lambda r: -r[1]["cpu_ms"])
            ]
    write_json(out, report)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", choices=installed_backends())
    parser.add_argument("--shape", nargs=3, type=int, default=(16, 256, 4096))
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    if args.child:
        _child(args.child, shape)
        return 0
    forwarded = ["--shape", *map(str, shape)]
    reports = {
        backend: run_child(Path(__file__), backend, forwarded)
        for backend in args.backends or installed_backends()
    }
    for backend, report in reports.items():
        print(f"\n{backend}, logits {shape}: passes over logits-sized arrays\n")
        rows = []
        for variant, passes in report["variants"].items():
            for found in passes:
                if backend == "torch":
                    rows.append(
                        [variant, found["instruction"], found["calls"],
                         f"{found['cpu_ms']:.1f}"]
                    )  # fmt: skip
                else:
                    rows.append(
                        [variant, found["instruction"], found["op"],
                         "gather" if found["gather"] else found["reads"],
                         found["writes"], found["exps"]]
                    )  # fmt: skip
        headers = (
            ["variant", "operator", "calls (3 steps)", "self CPU ms"]
            if backend == "torch"
            else ["variant", "instruction", "from", "reads", "writes", "exps"]
        )
        print(markdown_table(headers, rows))
    write_json(args.json, reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
