"""Memory and time of `kmask.fused_linear_crossentropy` against `Dense` + the
masked cross-entropy on materialised logits, and whether they agree.

    python benchmarks/fused_linear.py                    # every installed backend
    python benchmarks/fused_linear.py --quick            # small shapes: a smoke test
    python benchmarks/fused_linear.py --backends jax --json bench_fused_linear.json
    python benchmarks/fused_linear.py --vocabulary 262144   # Gemma's vocabulary
    python benchmarks/fused_linear.py --no-padding       # every token real
    python benchmarks/fused_linear.py --side-by-side     # times in one process
    python benchmarks/fused_linear.py --mesh 2x4         # JAX: memory per device

The loss of the logits `hidden @ kernel + bias` (`tokens = batch * time =
8192`, `hidden = 512`, `vocabulary = 32768` by default; lengths uniform in
`[T/4, T]`, padding labelled -100; every token real with `--no-padding`)
and its gradients with respect to
`hidden`, `kernel` and `bias`, two ways:

- `materialised`: `ops.matmul(hidden, kernel) + bias` (what `Dense` computes)
  into `kmask.MaskedSparseCategoricalCrossentropy(from_logits=True,
  mask_value=-100)`: the `[tokens, vocabulary]` logits and their gradient exist;
- `chunked`: `kmask.fused_linear_crossentropy(...)` at its default
  `chunk_size="auto"` (`--chunk-size` sets tokens instead; each backend
  reports the chunk it ran);
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

`--side-by-side` times instead, in one process per backend, the variants in
interleaved rounds (`benchmarks/_common.py`), so that every ratio is taken on
the same machine at the same moment: `chunked`, `materialised`, `native`
(`hidden @ kernel + bias` into the backend's own masked cross-entropy, as
`benchmarks/masked_ce.py` defines it, padding labelled -100) and on PyTorch
`torch`, plus the compiled columns: on PyTorch `chunked`, `materialised` and
`native` again under `torch.compile(dynamic=False)`; on JAX and TensorFlow
every step is compiled already (XLA). It reports the medians and each
variant's median over the `materialised` one's (the compiled ones over
`materialised compiled`), and the range of that ratio over the rounds.

`--mesh 2x4` (JAX only) compiles the step on 8 logical CPU devices
(`--xla_force_host_platform_device_count`), never running it: a
`keras.distribution.ModelParallel` over a `DeviceMesh((2, 4), ("batch",
"model"))` whose `LayoutMap` shards a tied `[vocabulary, hidden]` embedding
over the vocabulary on the model axis (`transpose_kernel=True`, no bias), the
hidden states and labels over the batch. It reports each device's compiled
temporary memory (`memory_analysis()`) for the chunked head and the
materialised step, against the same step on one device, the goal (one
device's temporary memory over the model axis, plus one chunk of logits), and
the all-gathers in the compiled program (whether XLA gathers the embedding).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from _common import (
    backend_info,
    discard_outputs,
    installed_backends,
    interleaved_medians,
    machine,
    markdown_table,
    measure_step,
    memory_row,
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
    import keras
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
    if variant == "native":
        sys.path.insert(0, str(Path(__file__).parent))
        from masked_ce import native_loss

        native_sparse = native_loss(keras.backend.backend(), "sparse")

        def native(hidden, kernel, bias, labels):
            logits = ops.matmul(hidden, kernel) + bias
            valid = ops.not_equal(labels, PAD_LABEL)
            return native_sparse(logits, ops.where(valid, labels, 0), valid)

        return native
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, mask_value=PAD_LABEL
    )

    def materialised(hidden, kernel, bias, labels):
        return loss(labels, ops.matmul(hidden, kernel) + bias)

    return materialised


def _step(loss_fn, backend: str, torch_compile: bool = False):
    """`step(hidden, kernel, bias, labels) -> (loss, (d_hidden, d_kernel,
    d_bias))`, compiled as the module docstring says; with `torch_compile`
    (PyTorch), the loss compiled by `torch.compile`."""
    if torch_compile:
        import torch

        loss_fn = torch.compile(loss_fn, dynamic=False)
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
    jax_compiled = step.compiled if backend == "jax" else None
    report = measure_step(step, inputs, variant, OUTPUTS, repeats, jax_compiled)
    write_json(out, {**report, "chunk": _chunk_of(chunk_size, shape)})


def _chunk_of(chunk_size: int | str, shape: dict) -> int:
    """The tokens per chunk the head runs at on this backend: `chunk_size`,
    or what `"auto"` resolves to for what its implementation holds."""
    from kmask import _chunking
    from kmask.ops.linear import held_rows

    hidden, vocabulary = shape["hidden"], shape["vocabulary"]
    rows = held_rows(hidden, vocabulary)
    return _chunking.resolve_chunk_size(chunk_size, hidden, vocabulary, rows)


# `--side-by-side`: the variants timed in one process, and on PyTorch the
# ones compiled again by `torch.compile` (named with this suffix).
SIDE_BY_SIDE = ("chunked", "materialised", "native")
COMPILED = " compiled"


def _side_by_side_child(out: Path, shape: dict, chunk_size: int, repeats: int):
    import keras
    from keras import ops

    backend = keras.backend.backend()
    arrays = make_inputs(**shape)
    inputs = [ops.convert_to_tensor(arrays[key]) for key in arrays]
    vocabulary = shape["vocabulary"]
    steps = {
        v: _step(_loss_fn(v, chunk_size, vocabulary), backend) for v in SIDE_BY_SIDE
    }
    if backend == "torch":
        steps["torch"] = _step(_loss_fn("torch", chunk_size, vocabulary), backend)
        for variant in SIDE_BY_SIDE:
            loss_fn = _loss_fn(variant, chunk_size, vocabulary)
            steps[variant + COMPILED] = _step(loss_fn, backend, torch_compile=True)

    def run(step):
        ops.convert_to_numpy(step(*inputs)[0])

    timed = interleaved_medians(
        {variant: (lambda s=step: run(s)) for variant, step in steps.items()},
        warmup=1,
        repeats=repeats,
    )
    chunk = _chunk_of(chunk_size, shape)
    write_json(out, {**backend_info(), "timings": timed, "chunk": chunk})


def _side_by_side_rows(reports: dict[str, dict]) -> list[list[str]]:
    rows = []
    for backend, report in reports.items():
        medians = {v: t["median_ms"] for v, t in report["timings"].items()}
        for variant, median in medians.items():
            # Compiled against compiled: on JAX and TensorFlow every step is.
            reference = "materialised" + (COMPILED if COMPILED in variant else "")
            times = report["timings"][variant]["times_ms"]
            # The same round's times: a ratio of one moment of the machine.
            ratios = [
                t / r
                for t, r in zip(
                    times, report["timings"][reference]["times_ms"], strict=True
                )
            ]
            rows.append(
                [
                    backend,
                    variant,
                    f"{median:.1f}",
                    f"{min(times):.1f}-{max(times):.1f}",
                    f"{median / medians[reference]:.2f}",
                    f"{min(ratios):.2f}-{max(ratios):.2f}",
                ]
            )
    return rows


def _mesh_child(out: Path, shape: dict, chunk_size: int, mesh_shape: tuple):
    """The compiled memory of the step on one device and on the mesh (see
    the module docstring), never run."""
    import re

    import jax
    import keras

    import kmask

    arrays = make_inputs(**shape)
    hidden, labels = arrays["hidden"], arrays["labels"]
    embedding = np.ascontiguousarray(arrays["kernel"].T)
    loss = kmask.MaskedSparseCategoricalCrossentropy(
        from_logits=True, mask_value=PAD_LABEL
    )
    steps = {
        "chunked": lambda h, e, y: kmask.fused_linear_crossentropy(
            h, e, y, mask_value=PAD_LABEL, chunk_size=chunk_size, transpose_kernel=True
        ),
        "materialised": lambda h, e, y: loss(y, keras.ops.einsum("btw,vw->btv", h, e)),
    }
    device_mesh = keras.distribution.DeviceMesh(
        mesh_shape, ("batch", "model"), devices=jax.devices()
    )
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map["embeddings"] = ("model", None)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    placed = [
        keras.distribution.distribute_tensor(
            hidden, distribution.get_data_layout(hidden.shape)
        ),
        keras.distribution.distribute_tensor(embedding, layout_map["embeddings"]),
        keras.distribution.distribute_tensor(
            labels, distribution.get_data_layout(labels.shape)
        ),
    ]
    results = {}
    for variant, fn in steps.items():
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        for devices, args in (("1", (hidden, embedding, labels)), ("mesh", placed)):
            # As a Keras user shards a model: under the distribution's scope.
            scope = distribution.scope() if devices == "mesh" else nullcontext()
            with scope:
                compiled = step.lower(*args).compile()
            analysis = compiled.memory_analysis()
            text = compiled.as_text()
            results[f"{variant}/{devices}"] = {
                "temp_bytes": analysis.temp_size_in_bytes,
                "argument_bytes": analysis.argument_size_in_bytes,
                "output_bytes": analysis.output_size_in_bytes,
                "all_gathers": re.findall(r"= (\S+) all-gather\(", text),
                "all_reduces": re.findall(r"= (\S+) all-reduce\(", text),
            }
    write_json(out, {**backend_info(), "mesh": list(mesh_shape), **results})


def _mesh_rows(report: dict, shape: dict, chunk_size: int) -> list[list[str]]:
    model = report["mesh"][1]
    chunk_bytes = 4 * chunk_size * shape["vocabulary"]
    rows = []
    for variant in ("chunked", "materialised"):
        one, mesh = report[f"{variant}/1"], report[f"{variant}/mesh"]
        goal = one["temp_bytes"] / model + chunk_bytes
        gathers = mesh["all_gathers"]
        rows.append(
            [
                variant,
                f"{one['temp_bytes'] / 2**20:.1f}",
                f"{mesh['temp_bytes'] / 2**20:.1f}",
                f"{mesh['temp_bytes'] / one['temp_bytes']:.2f}",
                f"{goal / 2**20:.1f}",
                "yes" if mesh["temp_bytes"] <= goal else "no",
                f"{one['argument_bytes'] / 2**20:.0f} / "
                f"{mesh['argument_bytes'] / 2**20:.0f}",
                ", ".join(gathers) if gathers else "none",
            ]
        )
    return rows


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


def _mesh_shape(text: str) -> tuple[int, int]:
    batch, _, model = text.partition("x")
    if not (batch.isdigit() and model.isdigit()):
        raise SystemExit(f"--mesh: expected BATCHxMODEL, e.g. 2x4. Received: {text}")
    return int(batch), int(model)


def _title(shape: dict, chunk_size: int) -> str:
    sizes = ", ".join(f"{key} {value}" for key, value in shape.items())
    labels = make_inputs(**shape)["labels"]
    sizes += f", {int((labels != PAD_LABEL).sum())} real tokens of {labels.size}"
    return f"Fused linear cross-entropy, {sizes}, chunk_size {chunk_size}"


def _mesh_main(args, forwarded, mesh_shape, shape, chunk_size, title) -> int:
    """`--mesh`: one JAX child on `batch * model` logical CPU devices."""
    devices = mesh_shape[0] * mesh_shape[1]
    os.environ["XLA_FLAGS"] = " ".join(
        [
            os.environ.get("XLA_FLAGS", ""),
            f"--xla_force_host_platform_device_count={devices}",
        ]
    ).strip()
    report = run_child(Path(__file__), "jax", [*forwarded, "--mesh", args.mesh])
    print(
        f"\n{title}; tied [vocabulary, hidden] embedding sharded over the "
        f"vocabulary on a {args.mesh} (batch x model) mesh of {devices} CPU "
        f"devices ({machine()}; jax {report['version']})\n"
    )
    headers = [
        "variant",
        "temp MiB, 1 device",
        "temp MiB per device, mesh",
        "mesh / 1",
        "goal MiB (1 device / model + chunk)",
        "meets goal",
        "argument MiB, 1 / mesh",
        "all-gathers on the mesh",
    ]
    print(markdown_table(headers, _mesh_rows(report, shape, chunk_size)))
    write_json(args.json, {"machine": machine(), "argv": sys.argv, **report})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", choices=installed_backends())
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument(
        "--chunk-size",
        type=lambda text: text if text == "auto" else int(text),
        default="auto",
        help="tokens per chunk, or 'auto' (the head's default; --mesh: 256)",
    )
    parser.add_argument("--vocabulary", type=int, help=f"default {FULL['vocabulary']}")
    parser.add_argument("--batch", type=int, help=f"default {FULL['batch']}")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps")
    parser.add_argument(
        "--no-padding", action="store_true", help="every token real (no -100)"
    )
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="time every variant in one process per backend (compiled columns)",
    )
    parser.add_argument(
        "--mesh", metavar="BxM", help="JAX: memory per device on a batch x model mesh"
    )
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = dict(QUICK if args.quick else FULL)
    if args.vocabulary:
        shape["vocabulary"] = args.vocabulary
    if args.batch:
        shape["batch"] = args.batch
    if args.no_padding:
        shape["padding"] = False
    chunk_size = args.chunk_size
    mesh_shape = _mesh_shape(args.mesh) if args.mesh else None
    if mesh_shape and chunk_size == "auto":
        # One chunk on both sides, fixed, so that the goal's chunk is the
        # one both steps ran (the figure in docs/measured.md is at 256).
        chunk_size = 256
    if args.quick and chunk_size != "auto":
        chunk_size = min(chunk_size, 64)
    if args.child:
        if mesh_shape:
            _mesh_child(args.child, shape, chunk_size, mesh_shape)
        elif args.side_by_side:
            _side_by_side_child(args.child, shape, chunk_size, args.repeats)
        else:
            _child(args.child, args.variant, shape, chunk_size, args.repeats)
        return 0
    forwarded = ["--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats)]
    forwarded += ["--quick"] if args.quick else []
    forwarded += ["--vocabulary", str(args.vocabulary)] if args.vocabulary else []
    forwarded += ["--batch", str(args.batch)] if args.batch else []
    forwarded += ["--no-padding"] if args.no_padding else []
    title = _title(shape, chunk_size)
    if mesh_shape:
        return _mesh_main(args, forwarded, mesh_shape, shape, chunk_size, title)
    if args.side_by_side:
        forwarded += ["--side-by-side"]
        reports = {
            backend: run_child(Path(__file__), backend, forwarded)
            for backend in args.backends or installed_backends()
        }
        versions = ", ".join(
            f"{b} {r['version']} on {r['device']}, chunk {r['chunk']}"
            for b, r in reports.items()
        )
        print(
            f"\n{title}, median of {args.repeats} interleaved rounds after 1 "
            f"warm-up, one process per backend ({machine()}; {versions})\n"
        )
        headers = ["backend", "variant", "ms", "range ms", "/ materialised"]
        headers += ["per round"]
        print(markdown_table(headers, _side_by_side_rows(reports)))
        write_json(args.json, {"machine": machine(), "argv": sys.argv, **reports})
        return 0
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
            rows.append(memory_row(backend, variant, report))
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
            discard_outputs(report["outputs"])
    print(
        f"\n{title} ({machine()}; "
        + ", ".join(
            f"{b} {v['chunked']['version']} on {v['chunked']['device']}, "
            f"chunk {v['chunked']['chunk']}"
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
