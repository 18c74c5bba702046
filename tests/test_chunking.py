"""`chunk_size="auto"`: the head's chunk from its shapes and a byte budget."""

from __future__ import annotations

import json
import sys

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kmask
import kmask.fused
from kmask import _chunking, _head
from tests._grad import value_and_grad
from tests._numeric import close, linear_data
from tools.backends import REPOSITORY, backend_environment, run_in_own_session
from tools.parity import references

PAD = -100


def _np_chunk(hidden_size, vocabulary, budget, rows=2):
    """The largest power of two `c` with `4 * c * (rows * vocabulary + 2 *
    hidden_size) <= budget`, clipped to [16, 8192], by counting up."""
    chunk = 1
    while 4 * (2 * chunk) * (rows * vocabulary + 2 * hidden_size) <= budget:
        chunk *= 2
    return min(max(chunk, 16), 8192)


@pytest.mark.parametrize(
    ("hidden_size", "vocabulary", "expected"),
    [(512, 32768, 256), (2304, 262144, 32), (32, 1000, 8192), (4096, 10**7, 16)],
)
def test_auto_chunk_size_of_known_heads(hidden_size, vocabulary, expected):
    assert _chunking.auto_chunk_size(hidden_size, vocabulary) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 16384),
    st.integers(2, 2**20),
    st.integers(1, 2**32),
    st.sampled_from([1, 2]),
)
def test_auto_chunk_size_is_the_largest_power_of_two_in_the_budget(
    hidden_size, vocabulary, budget, rows
):
    chunk = _chunking.auto_chunk_size(hidden_size, vocabulary, budget, rows)
    assert chunk == _np_chunk(hidden_size, vocabulary, budget, rows)


def _spy(monkeypatch):
    """Records the chunk size each call of the head's op receives."""
    seen = []
    op = _head.linear_crossentropy

    def spy(*args, **kwargs):
        seen.append(args[6].chunk_size)
        return op(*args, **kwargs)

    monkeypatch.setattr(_head, "linear_crossentropy", spy)
    return seen


def test_the_default_is_auto_from_the_kernel_shape(monkeypatch):
    seen = _spy(monkeypatch)
    rng = np.random.default_rng(0)
    data = linear_data(rng, 2, 3, 5, 40)
    kmask.fused_linear_crossentropy(data["hidden"], data["kernel"], data["labels"])
    kmask.fused_linear_crossentropy(
        data["hidden"], data["kernel"].T, data["labels"], transpose_kernel=True
    )
    head = kmask.FusedLinearCrossentropy(40)
    head([data["hidden"], data["labels"]])
    monkeypatch.setattr(_chunking, "CHUNK_BUDGET_BYTES", 8 * 64 * (40 + 5))
    kmask.fused_linear_crossentropy(data["hidden"], data["kernel"], data["labels"])
    assert seen == [8192, 8192, 8192, 64]
    assert head.get_config()["chunk_size"] == "auto"
    restored = kmask.FusedLinearCrossentropy.from_config(head.get_config())
    assert restored.get_config() == head.get_config()


def test_auto_chunk_follows_what_the_implementation_holds(monkeypatch):
    """At hidden 512 and vocabulary 32768 the `keras.ops` loop reads the
    rows in vocabulary slices and holds one row of the vocabulary per token
    (512 tokens in the budget); the PyTorch kernel holds two (256), as do
    the statistics, and a vocabulary of no useful divisor, read whole."""
    seen = _spy(monkeypatch)
    hidden = np.zeros((1, 1, 512), "float32")
    for vocabulary in (32768, 32771):
        kernel = np.zeros((512, vocabulary), "float32")
        kmask.fused_linear_crossentropy(hidden, kernel, [[1]])
    kmask.fused_linear_crossentropy(hidden, kernel[:, :32768], [[1]], return_stats=True)
    sliced = 256 if keras.backend.backend() == "torch" else 512
    assert seen == [sliced, 256, 256]


def test_auto_chunks_match_numpy(monkeypatch):
    # A budget of one 16-token chunk: 21 tokens are two chunks, one partial.
    batch, steps, width, vocabulary = 3, 7, 4, 9
    monkeypatch.setattr(_chunking, "CHUNK_BUDGET_BYTES", 8 * 16 * (width + vocabulary))
    rng = np.random.default_rng(1)
    data = linear_data(rng, batch, steps, width, vocabulary)
    valid = np.arange(steps)[None, :] < np.array([7, 2, 5])[:, None]
    data["hidden"][~valid] = np.nan
    labels = np.where(valid, data["labels"], PAD).astype("int32")
    expected = references.np_linear(
        data["hidden"].astype("float64"),
        data["kernel"],
        data["bias"],
        labels,
        valid,
        None,
        "token_mean",
    )
    loss, grad = value_and_grad(
        lambda hidden: kmask.fused_linear_crossentropy(
            hidden, data["kernel"], labels, data["bias"], mask_value=PAD
        ),
        data["hidden"],
    )
    close(loss, expected["value"])
    close(grad, expected["grad_hidden"])


@pytest.mark.parametrize("chunk_size", ["Auto", "big", 0, -1, True, 2.5, None])
def test_bad_chunk_size_raises(chunk_size):
    with pytest.raises(ValueError, match=r"`chunk_size`.*'auto'"):
        kmask.FusedLinearCrossentropy(10, chunk_size=chunk_size)
    with pytest.raises(ValueError, match=r"`chunk_size`.*'auto'"):
        kmask.fused_linear_crossentropy(
            np.zeros((1, 2, 3), "float32"), np.zeros((3, 4), "float32"), [[0, 1]],
            chunk_size=chunk_size,
        )  # fmt: skip


def test_auto_under_keras_fit_and_save(tmp_path):
    tokens = keras.Input((6,), dtype="int32")
    labels = keras.Input((6,), dtype="int32")
    embedding = keras.layers.Embedding(50, 8)
    hidden = embedding(tokens)
    head = kmask.FusedLinearCrossentropy(50, embedding=embedding, mask_value=PAD)
    model = keras.Model([tokens, labels], head([hidden, labels]))
    model.compile(optimizer="adam", loss=None)
    rng = np.random.default_rng(2)
    x = rng.integers(0, 50, (4, 6)).astype("int32")
    y = np.where(np.arange(6) < 4, rng.integers(0, 50, (4, 6)), PAD).astype("int32")
    history = model.fit([x, y], epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    path = tmp_path / "auto.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert restored.layers[-1].get_config()["chunk_size"] == "auto"
    close(restored.evaluate([x, y], verbose=0), model.evaluate([x, y], verbose=0))


def _np_token_chunks(valid, shards, chunk_size):
    """NumPy: the chunks' token positions (`-1`: padding) and the number of
    active chunks, counted one shard at a time: each shard's real tokens
    first, cut into chunks, and chunk `i` the `i`-th chunk of every shard."""
    length = len(valid) // shards
    chunk = min(chunk_size, max(length, 1))
    chunks = max(-(-length // chunk), 1)
    cut, active = [], 0
    for shard in range(shards):
        positions = np.arange(shard * length, (shard + 1) * length)
        real = positions[valid[positions]]
        ordered = np.concatenate([real, positions[~valid[positions]]])
        ordered = np.pad(ordered, (0, chunks * chunk - length), constant_values=-1)
        cut.append(ordered.reshape(chunks, chunk))
        active = max(active, -(-len(real) // chunk))
    return np.concatenate(cut, axis=1), active


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_token_chunks_cut_each_shard_alone_like_numpy(data):
    """`token_chunks` against a NumPy count, over 1-4 batch shards (the
    mesh's batch axis patched): the rows in each chunk, the chunks that hold
    a real token, `take` of a chunk's rows, and `unchunk` back to the
    tokens' order."""
    from kmask.ops import _chunks

    shards = data.draw(st.sampled_from([1, 2, 3, 4]))
    tokens = shards * data.draw(st.integers(0, 9))
    chunk_size = data.draw(st.integers(1, 6))
    valid = np.array(
        data.draw(st.lists(st.booleans(), min_size=tokens, max_size=tokens)), bool
    )
    positions, active = _np_token_chunks(valid, shards, chunk_size)
    # Each token's row is its position, so a row shows where it came from.
    rows = np.arange(tokens, dtype="float32")[:, None] * np.ones((1, 3), "float32")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_chunks, "batch_shards", lambda tokens: shards)
        chunks = _chunks.token_chunks(
            keras.ops.convert_to_tensor(valid),
            chunk_size,
            keras.ops.convert_to_tensor(rows),
        )
        assert int(chunks.active) == active
        cut = keras.ops.convert_to_numpy(chunks.rows[0])
        close(
            cut,
            np.where(positions[..., None] >= 0, positions[..., None], 0.0) * np.ones(3),
        )
        for index in range(min(active, len(positions))):
            taken = keras.ops.convert_to_numpy(
                chunks.take(keras.ops.convert_to_tensor(rows), index)
            )
            real = positions[index] >= 0
            close(taken[real], rows[positions[index][real]])
        close(keras.ops.convert_to_numpy(chunks.unchunk(chunks.rows[0])), rows)


MESH_HEAD = """
import json, re, sys
import jax, keras, numpy as np
import kmask, kmask.ops._chunks

kmask.ops._chunks.SLICE_BYTES = 1
kmask.ops._chunks.MAX_SLICES = 4
with np.load(sys.argv[1]) as arrays:
    hidden, embedding, labels = (arrays[k] for k in ("hidden", "embedding", "labels"))
mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), jax.devices())
layout_map = keras.distribution.LayoutMap(mesh)
layout_map["embeddings"] = ("model", None)
distribution = keras.distribution.ModelParallel(
    layout_map=layout_map, batch_dim_name="batch"
)


def loss(h, e):
    return kmask.fused_linear_crossentropy(
        h, e, labels, mask_value=-100, chunk_size=8, transpose_kernel=True,
        softcap=3.0, label_smoothing=0.1, z_loss=0.01,
    )


placed = (
    keras.distribution.distribute_tensor(
        hidden, distribution.get_data_layout(hidden.shape)
    ),
    keras.distribution.distribute_tensor(embedding, layout_map["embeddings"]),
)
with distribution.scope():
    slices = kmask.ops._chunks.vocabulary_slices(8, 32)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = step.lower(*placed).compile()
    value, (d_hidden, d_embedding) = compiled(*placed)
print(json.dumps({
    "slices": slices,
    "value": float(value),
    "d_hidden": np.asarray(d_hidden).tolist(),
    "d_embedding": np.asarray(d_embedding).tolist(),
    "gathers": re.findall(r"= (\\S+) all-gather\\(", compiled.as_text()),
}))
"""


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="a JAX device mesh")
def test_sharded_vocabulary_slices_stay_on_their_device_and_match_numpy(tmp_path):
    """The head under a Keras `ModelParallel` distribution on a 2x4 mesh of
    8 logical CPU devices, its tied `[vocabulary, hidden]` embedding sharded
    over the vocabulary: each chunk is read in slices within each device's
    quarter of the vocabulary (`vocabulary_slices`: 4 steps of 2 columns of
    each quarter), so XLA gathers no embedding; the tokens are ordered and
    chunked within each batch shard (`token_chunks`), so it gathers no
    hidden states either; and the value and gradients match NumPy."""
    rng = np.random.default_rng(5)
    hidden = rng.normal(size=(4, 6, 8)).astype("float32")
    embedding = rng.normal(size=(32, 8)).astype("float32")
    labels = rng.integers(0, 32, size=(4, 6)).astype("int32")
    # Batch shard 0 (rows 0-1) holds 10 real tokens, shard 1 holds 4: the
    # loops run over shard 0's two chunks, shard 1's second is padding.
    labels[1, 4:] = PAD
    labels[2:, 2:] = PAD
    arrays = tmp_path / "arrays.npz"
    np.savez(arrays, hidden=hidden, embedding=embedding, labels=labels)
    env = backend_environment(
        "jax", XLA_FLAGS="--xla_force_host_platform_device_count=8"
    )
    command = [sys.executable, "-c", MESH_HEAD, str(arrays)]
    completed = run_in_own_session(command, env, 300, cwd=str(REPOSITORY))
    assert completed.returncode == 0, completed.stderr[-4000:]
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert found["slices"] == [2, 4]
    # Nothing is gathered across devices: no embedding, no logits, and no
    # tokens (each batch shard is ordered and chunked on its own device).
    assert found["gathers"] == []
    expected = references.np_linear(
        hidden, embedding.T, None, labels, labels != PAD, None, "token_mean",
        softcap=3.0, label_smoothing=0.1, z_loss=0.01,
    )  # fmt: skip
    close(found["value"], expected["value"])
    close(np.asarray(found["d_hidden"]), expected["grad_hidden"])
    close(np.asarray(found["d_embedding"]), expected["grad_kernel"].T)
