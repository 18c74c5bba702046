"""mask_report: which layers drop the mask, and whether the loss sees one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops
from packaging.version import Version

from kmask.layers import AttachMask, LengthMask
from kmask.masks import keras_mask
from kmask.report import mask_report

# Keras 3.16 (keras-team/keras #23235) sets `supports_masking = False` on its
# RNNs: before it, `return_sequences=True` carries the mask to the output.
RNNS_KEEP_MASK = Version(keras.__version__) < Version("3.16.0.dev0")
SEED_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "seed_seq2seq.py"


def _seed_module():
    spec = importlib.util.spec_from_file_location("seed_seq2seq", SEED_EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _masking_layer(model) -> keras.layers.Masking:
    return next(x for x in model.layers if isinstance(x, keras.layers.Masking))


def _runtime_output_masks(model, inputs) -> list[bool]:
    """Whether each output carries a mask when the model runs on real data."""
    outputs = model(inputs)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [keras_mask(output) is not None for output in outputs]


def _lines_by_layer(report) -> dict[str, str]:
    lines = str(report).splitlines()[2:]
    return {line.split()[0]: line for line in lines}


def test_seed_model_names_the_encoder_lstm():
    seed = _seed_module()
    model = seed.build_seed_model()

    report = mask_report(model)

    assert report.dropped_by == ["encoder"]
    assert report.loss_sees_mask is False
    assert _runtime_output_masks(model, ops.convert_to_tensor(seed.X, "float32")) == [
        False
    ]
    text = str(report)
    assert "NO mask" in text.splitlines()[0]
    assert "dropped by: encoder" in text.splitlines()[0]
    lines = _lines_by_layer(report)
    assert len(lines) == len(model.layers)
    assert lines["encoder"].split()[1:] == [
        "LSTM",
        "(None,",
        "5)",
        "-",
        "<-",
        "drops",
        "the",
        "mask",
    ]
    masking = _masking_layer(model).name
    assert lines[masking].split()[1:] == ["Masking", "-", "(None,", "5)"]
    assert sum("drops" in line for line in lines.values()) == 1


def test_seed_model_with_attach_mask_lets_the_loss_see_the_mask():
    seed = _seed_module()
    base = seed.build_seed_model()
    restored = AttachMask(name="attach")([base.output, _masking_layer(base).output])
    model = keras.Model(base.input, restored)

    report = mask_report(model)

    assert report.loss_sees_mask is True
    assert report.dropped_by == ["encoder"]
    assert str(report).splitlines()[0].startswith("mask report: the loss sees the mask")
    assert _lines_by_layer(report)["attach"].split()[1:] == [
        "AttachMask",
        "(None,",
        "5)",
        "(None,",
        "5)",
    ]
    assert _runtime_output_masks(model, ops.convert_to_tensor(seed.X, "float32")) == [
        True
    ]


@pytest.mark.parametrize("return_sequences", [True, False])
def test_sequential_model(return_sequences):
    model = keras.Sequential(
        [
            keras.Input((4, 2)),
            keras.layers.Masking(name="masking"),
            keras.layers.LSTM(3, return_sequences=return_sequences, name="lstm"),
            keras.layers.Dense(2, name="dense"),
        ]
    )

    report = mask_report(model)

    keeps = return_sequences and RNNS_KEEP_MASK
    assert report.loss_sees_mask is keeps
    assert report.dropped_by == ([] if keeps else ["lstm"])
    assert list(_lines_by_layer(report))[-3:] == ["masking", "lstm", "dense"]
    assert _runtime_output_masks(model, ops.ones((1, 4, 2))) == [keeps]


def test_sequential_model_built_without_input():
    model = keras.Sequential([keras.layers.Masking(), keras.layers.GRU(2)])
    model.build((None, 3, 1))

    assert mask_report(model).dropped_by == [model.layers[1].name]


def test_an_op_on_symbolic_tensors_that_drops_the_mask_is_named():
    inputs = keras.Input((4, 2))
    masked = keras.layers.Masking()(inputs)
    scaled = masked * 2.0  # keras #18416: ops on KerasTensors drop the mask
    model = keras.Model(inputs, keras.layers.Dense(1)(scaled))

    report = mask_report(model)

    assert len(report.dropped_by) == 1
    assert report.layers[2].drops_mask
    assert report.layers[2].class_name == "Multiply"
    assert _runtime_output_masks(model, ops.ones((1, 4, 2))) == [False]


def test_layers_that_create_a_mask_and_an_explicit_mask_argument():
    steps = keras.Input((5, 2), name="steps")
    lengths = keras.Input((), dtype="int32", name="lengths")
    masked = LengthMask(name="length_mask")([steps, lengths])
    mask = keras.layers.Masking(name="masking")(steps)
    explicit = keras.layers.GRU(2, return_sequences=True, name="gru")(
        steps, mask=keras_mask(mask)
    )
    model = keras.Model([steps, lengths], [masked, explicit])

    report = mask_report(model)

    layers = {layer.name: layer for layer in report.layers}
    assert layers["length_mask"].mask_in is None
    assert layers["length_mask"].mask_out == (None, 5)
    assert layers["gru"].mask_in == (None, 5)
    assert layers["gru"].drops_mask is not RNNS_KEEP_MASK
    assert report.loss_sees_mask is RNNS_KEEP_MASK
    inputs = [ops.ones((2, 5, 2)), ops.convert_to_tensor(np.array([1, 5], "int32"))]
    assert _runtime_output_masks(model, inputs) == [True, RNNS_KEEP_MASK]


def test_one_output_without_a_mask_means_the_loss_does_not_see_it():
    inputs = keras.Input((3, 1))
    masked = keras.layers.Masking()(inputs)
    model = keras.Model(
        inputs, [keras.layers.Dense(1)(masked), keras.layers.GRU(1, name="gru")(masked)]
    )

    report = mask_report(model)

    assert report.loss_sees_mask is False
    assert report.dropped_by == ["gru"]


def test_a_shared_layer_gets_one_line_per_call():
    inputs = keras.Input((3, 1))
    masked = keras.layers.Masking()(inputs)
    shared = keras.layers.Dense(1, name="shared")
    model = keras.Model(inputs, shared(shared(masked)))

    report = mask_report(model)

    assert [layer.name for layer in report.layers].count("shared") == 2
    assert report.loss_sees_mask is True


def test_report_of_a_reloaded_model_is_the_same(tmp_path):
    seed = _seed_module()
    base = seed.build_seed_model()
    model = keras.Model(
        base.input, AttachMask()([base.output, _masking_layer(base).output])
    )
    path = str(tmp_path / "seed.keras")
    model.save(path)

    loaded = keras.saving.load_model(path)

    assert str(mask_report(loaded)) == str(mask_report(model))


def test_subclassed_and_unbuilt_models_raise():
    class Subclassed(keras.Model):
        def call(self, inputs):
            return inputs

    with pytest.raises(ValueError, match="functional or Sequential"):
        mask_report(Subclassed())
    with pytest.raises(ValueError, match="functional or Sequential"):
        mask_report(keras.Sequential([keras.layers.Dense(1)]))
