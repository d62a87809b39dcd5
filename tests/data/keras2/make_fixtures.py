"""Regenerate the Keras 2 fixtures of tests/test_io_keras.py.

Needs tf_keras (Keras 2) and TensorFlow, which are too large for CI; the
files it writes are committed.  Run from this directory:

    pip install tensorflow-cpu==2.21.0 tf-keras==2.21.0
    python make_fixtures.py

Writes <model>.h5 (model.save, legacy HDF5), <model>_weights.h5
(model.save_weights, legacy weights-only), a.keras (tf_keras' .keras) and
expected.npz (inputs and tf_keras' predict outputs).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

L = keras.layers
rng = np.random.default_rng(2024)


def randomize(model):
    model.set_weights([rng.uniform(-0.6, 0.6, w.shape).astype(np.float32)
                       for w in model.get_weights()])
    return model


def model_a():  # go_backwards, Bidirectional sum, hard_sigmoid, use_bias=False, return_state
    inp = keras.Input((6, 3))
    x = L.LSTM(4, return_sequences=True, go_backwards=True)(inp)
    x = L.Bidirectional(L.LSTM(3, return_sequences=True, recurrent_activation="hard_sigmoid"),
                        merge_mode="sum")(x)
    out = L.LSTM(3, recurrent_activation="hard_sigmoid", use_bias=False, return_state=True)(x)
    return keras.Model(inp, out)


def model_b():  # Sequential of Bidirectionals: concat, mul, ave
    return keras.Sequential([
        keras.Input((6, 3)),
        L.Bidirectional(L.LSTM(4, return_sequences=True)),
        L.Bidirectional(L.LSTM(3, return_sequences=True), merge_mode="mul"),
        L.Bidirectional(L.LSTM(2), merge_mode="ave"),
    ])


def model_c():  # merge_mode=None (a list), hard_sigmoid activation, relu
    inp = keras.Input((6, 3))
    out = L.Bidirectional(L.LSTM(3, return_sequences=True, activation="relu",
                                 recurrent_activation="hard_sigmoid"), merge_mode=None)(inp)
    return keras.Model(inp, out)


def model_d():  # time_major
    inp = keras.Input((4, 3))  # (N=4, In) per time step: Keras' batch axis is time
    out = L.LSTM(3, time_major=True, return_sequences=True, go_backwards=True)(inp)
    return keras.Model(inp, out)


def main():
    expected = {}
    for name, make, shape in (("a", model_a, (2, 6, 3)), ("b", model_b, (2, 6, 3)),
                              ("c", model_c, (2, 6, 3)), ("d", model_d, (6, 4, 3))):
        m = randomize(make())
        x = rng.normal(size=shape).astype(np.float32)
        y = m.predict(x, batch_size=shape[0], verbose=0)
        ys = y if isinstance(y, list) else [y]
        expected[f"{name}_x"] = x
        for k, v in enumerate(ys):
            expected[f"{name}_y{k}"] = np.asarray(v)
        m.save(f"{name}.h5")
        m.save_weights(f"{name}_weights.h5")
        if name == "a":
            m.save("a.keras")
    expected["keras_version"] = np.array(keras.__version__)
    np.savez("expected.npz", **expected)


if __name__ == "__main__":
    main()
