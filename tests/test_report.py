"""mask_report: which layers drop the mask, and whether each output's loss sees one.

The zoo in `tests/test_report_zoo.py` checks the verdicts against `evaluate`;
these tests check the table, the names and the words.
"""

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


def _padded(shape, padded_steps=2) -> np.ndarray:
    """Ones, with the second sequence's last `padded_steps` steps zero."""
    x = np.ones(shape, "float32")
    x[1, shape[1] - padded_steps :] = 0.0
    return x


def _runtime_output_masks(model, inputs) -> list[bool]:
    """Whether each output carries a mask when the model runs on real data."""
    outputs = model(inputs)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [keras_mask(output) is not None for output in outputs]


def _lines_by_layer(report) -> dict[str, str]:
    lines = str(report).splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("layer "))) + 1 :]
    return {line.split()[0]: line for line in table}


def test_seed_model_names_the_encoder_lstm_and_the_keras_version():
    seed = _seed_module()
    model = seed.build_seed_model()
    x = np.asarray(seed.X, "float32")

    report = mask_report(model, x)

    assert report.dropped_by == ["encoder"]
    assert report.loss_sees_mask is False
    (output,) = report.outputs
    assert (output.name, output.loss_sees_mask) == (model.output_names[0], False)
    assert output.dropped_by == ("encoder",)
    assert _runtime_output_masks(model, ops.convert_to_tensor(x)) == [False]
    header, verdict = str(report).splitlines()[:2]
    assert header == f"mask report (Keras {keras.__version__}, ran on the given batch)"
    assert verdict == (
        f"output {output.name}: the loss sees NO mask (it averages over "
        "padding); lost at: encoder"
    )
    lines = _lines_by_layer(report)
    assert len(lines) == len(model.layers)
    assert lines["encoder"].split()[1:] == [
        "LSTM",
        "(2,",
        "5)",
        "-",
        "<-",
        "drops",
        "the",
        "mask",
    ]
    assert lines["masking"].split()[1:] == ["Masking", "-", "(2,", "5)"]
    assert sum("drops" in line for line in lines.values()) == 1


def test_seed_model_without_a_batch_runs_on_a_synthetic_one():
    report = mask_report(_seed_module().build_seed_model())

    assert report.loss_sees_mask is False
    assert report.dropped_by == ["encoder"]
    assert "ran on a synthetic batch" in str(report).splitlines()[0]


def test_seed_model_with_attach_mask_lets_the_loss_see_the_mask():
    seed = _seed_module()
    base = seed.build_seed_model()
    restored = AttachMask(name="attach")([base.output, _masking_layer(base).output])
    model = keras.Model(base.input, restored)
    x = np.asarray(seed.X, "float32")

    report = mask_report(model, x)

    assert report.loss_sees_mask is True
    assert report.dropped_by == ["encoder"]
    assert str(report).splitlines()[1] == "output attach: the loss sees the mask"
    assert _lines_by_layer(report)["attach"].split()[1:] == [
        "AttachMask",
        "(2,",
        "5)",
        "(2,",
        "5)",
    ]
    assert _runtime_output_masks(model, ops.convert_to_tensor(x)) == [True]


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
    x = _padded((2, 4, 2))

    report = mask_report(model, x)

    keeps = return_sequences and RNNS_KEEP_MASK
    assert report.loss_sees_mask is keeps
    assert report.dropped_by == ([] if keeps else ["lstm"])
    assert list(_lines_by_layer(report))[-3:] == ["masking", "lstm", "dense"]
    assert _runtime_output_masks(model, x) == [keeps]


def test_sequential_model_built_without_input():
    model = keras.Sequential([keras.layers.Masking(), keras.layers.GRU(2)])
    model.build((None, 3, 1))

    report = mask_report(model, _padded((2, 3, 1), 1))

    assert report.dropped_by == [model.layers[1].name]


def test_an_op_on_symbolic_tensors_that_drops_the_mask_is_named():
    inputs = keras.Input((4, 2))
    masked = keras.layers.Masking()(inputs)
    scaled = masked * 2.0  # keras #18416: ops on KerasTensors drop the mask
    model = keras.Model(inputs, keras.layers.Dense(1)(scaled))

    report = mask_report(model, _padded((2, 4, 2)))

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
    inputs = [_padded((2, 5, 2)), np.array([5, 3], "int32")]

    report = mask_report(model, inputs)

    layers = {layer.name: layer for layer in report.layers}
    assert layers["length_mask"].mask_in is None
    assert layers["length_mask"].mask_out == (2, 5)
    assert layers["gru"].mask_in == (2, 5)
    assert layers["gru"].drops_mask is not RNNS_KEEP_MASK
    assert [out.loss_sees_mask for out in report.outputs] == [True, RNNS_KEEP_MASK]
    assert report.loss_sees_mask is RNNS_KEEP_MASK
    assert _runtime_output_masks(model, inputs) == [True, RNNS_KEEP_MASK]


def test_one_output_without_a_mask_means_the_loss_does_not_see_it():
    inputs = keras.Input((3, 1))
    masked = keras.layers.Masking()(inputs)
    model = keras.Model(
        inputs,
        [
            keras.layers.Dense(1, name="dense")(masked),
            keras.layers.GRU(1, name="gru")(masked),
        ],
    )

    report = mask_report(model, _padded((2, 3, 1), 1))

    assert report.loss_sees_mask is False
    assert report.dropped_by == ["gru"]
    assert [
        (out.name, out.loss_sees_mask, out.dropped_by) for out in report.outputs
    ] == [
        ("dense", True, ()),
        ("gru", False, ("gru",)),
    ]


def test_a_shared_layer_gets_one_line_per_call():
    inputs = keras.Input((3, 1))
    masked = keras.layers.Masking()(inputs)
    shared = keras.layers.Dense(1, name="shared")
    model = keras.Model(inputs, shared(shared(masked)))

    report = mask_report(model, _padded((2, 3, 1), 1))

    assert [layer.name for layer in report.layers].count("shared") == 2
    assert report.loss_sees_mask is True


def test_nested_models_show_their_layers_indented():
    inputs = keras.Input((4, 2))
    inner = keras.Sequential(
        [
            keras.layers.Masking(name="inner_masking"),
            keras.layers.GRU(2, name="inner_gru"),
        ],
        name="inner",
    )
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(inner(inputs)))

    report = mask_report(model, _padded((2, 4, 2)))

    depths = {layer.name: layer.depth for layer in report.layers}
    assert (depths["inner"], depths["inner_masking"], depths["inner_gru"]) == (0, 1, 1)
    assert report.dropped_by == ["inner_gru"]
    assert report.outputs[0].dropped_by == ("inner_gru",)
    assert "\n  inner_gru " in str(report)


def test_attention_removing_the_mask_from_its_inputs_is_shown():
    tokens = keras.Input((4,), dtype="int32")
    embedded = keras.layers.Embedding(5, 4, mask_zero=True, name="embedding")(tokens)
    attended = keras.layers.MultiHeadAttention(1, 2, name="attention")(
        embedded, embedded
    )
    model = keras.Model(tokens, keras.layers.Add(name="add")([embedded, attended]))

    report = mask_report(model, np.array([[1, 2, 0, 0], [1, 2, 3, 4]], "int32"))

    assert report.outputs[0].loss_sees_mask is False
    assert report.dropped_by == ["add"]
    assert _lines_by_layer(report)["attention"].endswith(
        "<- removes the mask from its inputs"
    )
    assert "(attention removed the mask from its inputs)" in report.outputs[0].verdict


def test_a_batch_without_padding_cannot_tell():
    model = keras.Sequential([keras.Input((3, 1)), keras.layers.Masking()])

    report = mask_report(model, np.ones((2, 3, 1), "float32"))

    assert report.loss_sees_mask is None
    assert "pass a batch with padding" in report.outputs[0].verdict


def test_report_of_a_reloaded_model_is_the_same(tmp_path):
    seed = _seed_module()
    base = seed.build_seed_model()
    model = keras.Model(
        base.input, AttachMask()([base.output, _masking_layer(base).output])
    )
    path = str(tmp_path / "seed.keras")
    model.save(path)

    loaded = keras.saving.load_model(path)

    x = np.asarray(seed.X, "float32")
    assert str(mask_report(loaded, x)) == str(mask_report(model, x))


class SubclassedMasking(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.masking = keras.layers.Masking()

    def call(self, inputs):
        return self.masking(inputs)


def test_a_subclassed_model_gets_verdicts_from_its_outputs():
    model = SubclassedMasking()

    unknown = mask_report(model)
    report = mask_report(model, _padded((2, 3, 1), 1))

    assert unknown.loss_sees_mask is None
    assert "pass a batch" in str(unknown).splitlines()[1]
    assert report.loss_sees_mask is True
    assert report.layers == ()


def test_a_batch_the_model_rejects_raises():
    model = keras.Sequential([keras.Input((3, 1)), keras.layers.Dense(1)])

    with pytest.raises(ValueError, match="incompatible"):
        mask_report(model, np.ones((2, 3, 4, 5), "float32"))
