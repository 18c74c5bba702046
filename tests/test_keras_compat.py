"""Canaries for the Keras internals in `kmask._keras_compat`.

Each test fails, naming the symbol and the Keras version, when a Keras
upgrade moves an internal kmask reads, so the fallback is never what CI runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from kmask import _keras_compat as compat
from tools.backends import REPOSITORY

PACKAGE = Path(compat.__file__).resolve().parent


def _moved(symbol: str) -> str:
    return (
        f"Keras {keras.__version__} moved `{symbol}`: kmask falls back to a "
        "weaker lookup. Add its new home to kmask/_keras_compat.py."
    )


def test_get_keras_mask_found_in_a_known_home():
    assert compat.GET_KERAS_MASK_HOME in compat.GET_KERAS_MASK_HOMES, _moved(
        "get_keras_mask"
    )


def test_get_keras_mask_reads_a_propagated_mask():
    x = np.zeros((2, 3, 1), "float32")
    x[0, 2] = 1.0
    masked = keras.layers.Masking(mask_value=0.0)(ops.convert_to_tensor(x))
    mask = compat.get_keras_mask(masked)
    assert mask is not None, _moved("get_keras_mask")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(mask), [[False, False, True], [False, False, False]]
    )
    assert compat.get_keras_mask(ops.convert_to_tensor(x)) is None


def _graph():
    inputs = keras.Input((4, 2), name="steps")
    explicit_mask = keras.Input((4,), dtype="bool", name="explicit_mask")
    masked = keras.layers.Masking(name="masking")(inputs)
    pool = keras.layers.GlobalAveragePooling1D(name="pool")
    outputs = pool(masked, mask=explicit_mask)
    return inputs, explicit_mask, masked, pool, outputs


def test_keras_history_and_inbound_nodes():
    inputs, _, _, pool, outputs = _graph()
    assert hasattr(outputs, "_keras_history"), _moved("KerasTensor._keras_history")
    assert hasattr(pool, "_inbound_nodes"), _moved("Operation._inbound_nodes")
    node = compat.producing_node(outputs)
    assert node is not None, _moved("_keras_history.operation/node_index")
    assert compat.node_operation(node) is pool, _moved("Node.operation")
    assert compat.node_operation(compat.producing_node(inputs)).name == "steps"
    assert compat.producing_node(keras.KerasTensor((2, 3))) is None


def test_node_arguments_and_outputs():
    _, explicit_mask, masked, _, outputs = _graph()
    node = compat.producing_node(outputs)
    assert hasattr(node, "arguments"), _moved("Node.arguments")
    assert hasattr(node.arguments, "keras_tensors"), _moved(
        "Node.arguments.keras_tensors"
    )
    assert hasattr(node.arguments, "kwargs"), _moved("Node.arguments.kwargs")
    assert hasattr(node, "outputs"), _moved("Node.outputs")
    assert [id(x) for x in compat.node_input_tensors(node)] == [
        id(masked),
        id(explicit_mask),
    ]
    assert [id(x) for x in compat.node_outputs(node)] == [id(outputs)]
    assert compat.node_mask_argument(node) is explicit_mask, _moved(
        "Node.arguments.kwargs['mask']"
    )


def test_upstream_layer_finds_a_layer_inside_a_nested_model():
    assert hasattr(keras.Model, "_flatten_layers"), _moved("Layer._flatten_layers")
    tokens = keras.Input((4,), dtype="int32")
    embedding = keras.layers.Embedding(5, 3, name="table")
    inner = keras.Model(tokens, keras.layers.Dense(3)(embedding(tokens)), name="inner")
    outer_tokens = keras.Input((4,), dtype="int32")
    hidden = keras.layers.Dense(3, name="after")(inner(outer_tokens))
    assert compat.upstream_layer(hidden, "table") is embedding
    assert compat.upstream_layer(hidden, "inner") is inner
    assert compat.upstream_layer(hidden, "missing") is None


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_no_other_module_imports_keras_internals(path):
    """`keras.src` is imported in `_keras_compat.py` alone."""
    if path.name == "_keras_compat.py":
        return
    tree = ast.parse(path.read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert not [name for name in imported if name and name.startswith("keras.src")]
    assert "keras.src" not in path.read_text()


def test_the_keras_range_is_the_tested_range():
    """pyproject's lower bound is the oldest Keras the matrix pins, and its upper
    bound admits the nightly the matrix pins."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.version import Version

    # The repository's files, also where the suite runs on the installed wheel.
    root = REPOSITORY
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    keras_requirement = next(
        Requirement(spec)
        for spec in project["dependencies"]
        if Requirement(spec).name == "keras"
    )

    def pinned(name: str, path: str) -> Version:
        for line in (root / path).read_text().splitlines():
            if line.startswith(f"{name}=="):
                return Version(line.split("==")[1])
        raise AssertionError(f"{path} pins no {name}")

    oldest = pinned("keras", "constraints-keras-oldest.txt")
    lower = {
        Version(s.version) for s in keras_requirement.specifier if s.operator == ">="
    }
    assert lower == {oldest}
    assert keras_requirement.specifier.contains(pinned("keras", "constraints.txt"))
    nightly = pinned("keras-nightly", "constraints-keras-nightly.txt")
    assert keras_requirement.specifier.contains(nightly.base_version)


def test_run_through_graph_is_intercepted_on_the_instance_only():
    inputs = keras.Input((3, 2))
    inner = keras.Sequential([keras.layers.Masking(name="inner_masking")], name="inner")
    model = keras.Model(inputs, keras.layers.Dense(1, name="dense")(inner(inputs)))
    seen = []

    def wrap(operation, call):
        seen.append(operation.name)
        return call

    with compat.intercept_graph_calls(model, wrap) as intercepted:
        model(np.ones((1, 3, 2), "float32"))

    assert intercepted, _moved("Function._run_through_graph")
    assert seen == ["inner", "inner_masking", "dense"], _moved(
        "Function._run_through_graph(inputs, operation_fn)"
    )
    assert all(
        compat.RUN_THROUGH_GRAPH not in vars(graph)
        for graph in compat.functional_graphs(model)
    )
    seen.clear()
    model(np.ones((1, 3, 2), "float32"))
    assert seen == []


def test_keras_distillation_is_found():
    # Public since Keras 3.12, the oldest Keras kmask supports.
    assert compat.DISTILLATION_LOSS_BASE is keras.distillation.DistillationLoss, _moved(
        "keras.distillation.DistillationLoss"
    )
    assert compat.DISTILLER_BASE is keras.distillation.Distiller, _moved(
        "keras.distillation.Distiller"
    )


def test_the_distiller_stand_in_says_what_is_missing():
    with pytest.raises(ValueError, match=r"keras\.distillation"):
        compat.DistillerMissing()


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="a TensorFlow internal"
)
def test_tensorflows_tape_check_is_found_and_answers():
    import tensorflow as tf

    found, home = compat.find_tape_check()
    assert found is not None, (
        f"TensorFlow {tf.__version__} moved `could_possibly_record`: the head "
        "computes its gradient in every eager call. Add its new home to "
        "kmask/_keras_compat.py (TAPE_HOMES)."
    )
    assert home in compat.TAPE_HOMES
    assert not compat.tape_recording()
    with tf.GradientTape():
        assert compat.tape_recording()
