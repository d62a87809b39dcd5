"""Keras Sequential models (Embedding -> LSTM layers -> Dense) as fastlstm.Network.

The LSTM layers are loaded by fastlstm.io.keras.load_keras (one parser of
LSTM configs and weights); this module reads the model config (JSON only),
finds the Embedding and the Dense head around the LSTMs and reads their
weights from the HDF5 datasets (h5py) -- nothing in the file is executed.

Where the weights sit:
  .keras / Keras 3 .weights.h5: ``layers/<snake_case class><_k>/vars/0..``
    (``<_k>`` counts earlier layers of the same class; TimeDistributed keeps
    its Dense at ``.../layer/vars``); the ``vars`` group's ``name`` attribute,
    when present, is checked against the layer name.
  legacy .h5: ``model_weights/<layer name>`` with the ``weight_names`` attribute
    giving the datasets in order.
  Embedding: [embeddings (vocab, dim)]; Dense: [kernel (in, out), bias (out)].
"""
from __future__ import annotations

import io

import numpy as np

from .errors import FastLSTMError, FormatError
from .io import keras as fk

_RECURRENT = ("LSTM", "CuDNNLSTM", "Bidirectional")
_ACTIVATION = {"linear": "none", None: "none", "softmax": "softmax",
               "log_softmax": "log_softmax", "sigmoid": "sigmoid"}


def _act_name(spec, what):
    name = spec
    if isinstance(spec, dict):  # a serialised function
        cfg = spec.get("config")
        name = cfg if isinstance(cfg, str) else (cfg or {}).get("name", spec.get("class_name"))
    if name not in _ACTIVATION:
        raise FormatError(f"{what}: activation {name!r} is not supported by fastlstm.Network "
                          "(linear, softmax, log_softmax, sigmoid)")
    return _ACTIVATION[name]


class _Weights:
    """Reads a non-recurrent layer's weights from a Keras source."""

    def __init__(self, kind, h5=None, group=None, model=None):
        self.kind, self.h5, self.group, self.model = kind, h5, group, model

    def get(self, name, h5path, inner, what):
        if self.kind == "live":
            try:
                layer = self.model.get_layer(name)
            except Exception as exc:  # noqa: BLE001
                raise FormatError(f"{what}: not found in the Keras model ({exc})") from exc
            return [fk._as_float_array(np.asarray(w), what) for w in layer.get_weights()]
        if self.kind == "new":
            path = self._find(name, h5path)
            grp = self.h5[path]
            if inner:
                if "layer" not in grp:
                    raise FormatError(f"{what}: no inner layer group in {path!r}")
                grp = grp["layer"]
            if "vars" not in grp:
                raise FormatError(f"{what}: no vars in weights group {path!r}")
            grp = grp["vars"]
            keys = sorted((k for k in grp.keys() if k.isdigit()), key=int)
            if [int(k) for k in keys] != list(range(len(keys))):
                raise FormatError(f"{what}: weights {path!r}/vars are not numbered 0..n-1")
            return [self._read(grp[k], f"{what}: {path}/vars/{k}") for k in keys]
        if name not in self.group:
            raise FormatError(f"{what}: no weights group {name!r}")
        grp = self.group[name]
        names = fk._str_list_attr(grp, "weight_names")
        if names is None:
            raise FormatError(f"{what}: no weight_names attribute")
        out = []
        for n in names:
            if n not in grp:
                raise FormatError(f"{what}: weight {n!r} listed but missing")
            out.append(self._read(grp[n], f"{what}: {n}"))
        return out

    def _read(self, ds, what):
        """One weight dataset, its header checked before any data is read: a
        floating-point dataset of at most the Keras loader's bound (~100x the
        file's size + 1 MiB; a small file may declare a huge dataset)."""
        h5py = fk._h5py()
        if not isinstance(ds, h5py.Dataset):
            raise FormatError(f"{what}: expected a weight dataset, got {type(ds).__name__}")
        if ds.dtype.kind != "f":
            raise FormatError(f"{what}: dtype {ds.dtype} is not floating point")
        nbytes = int(np.prod([int(d) for d in ds.shape], dtype=object)) * ds.dtype.itemsize
        fsize = int(ds.file.id.get_filesize())
        if nbytes > fk._MAX_INFLATE_RATIO * fsize + (1 << 20):
            raise FormatError(f"{what}: declares shape {ds.shape} {ds.dtype} ({nbytes} bytes), "
                              f"more than a {fsize}-byte file may expand to; refused before "
                              f"reading")
        return fk._as_float_array(ds[()], what)

    def _find(self, name, path):
        h5 = self.h5
        if path in h5:
            v = h5[path].get("vars")
            got = None if v is None else fk._attr(v, "name")
            if got is None or fk._text(got) == name:
                return path
        if "layers" in h5:
            for key in h5["layers"].keys():
                v = h5["layers"][key].get("vars")
                if v is not None and "name" in v.attrs and fk._text(fk._attr(v, "name")) == name:
                    return f"layers/{key}"
        if path in h5:
            return path
        raise FormatError(f"layer {name!r}: weights group {path!r} missing")


def _open(source, config):
    """-> (config dict, _Weights, closer)."""
    if fk._is_live_keras(source):
        try:
            cfg = source.get_config()
        except Exception as exc:  # noqa: BLE001
            raise FormatError(f"from_keras: get_config() failed ({exc})") from exc
        is_seq = any(c.__name__ == "Sequential" for c in type(source).__mro__)
        conf = {"class_name": "Sequential" if is_seq else type(source).__name__,
                "config": fk._jsonable(cfg)}
        return conf, _Weights("live", model=source), None
    what = str(source) if not hasattr(source, "read") else "Keras file"
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(bytes(source))
    config = fk._coerce_config(config)
    head = fk._read_head(source, what)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        import zipfile
        try:
            with zipfile.ZipFile(source) as zf:
                info = {i.filename: i for i in zf.infolist()}
                if "model.weights.h5" not in info:
                    raise FormatError(f"{what}: no model.weights.h5 in the archive")
                if config is None:
                    if "config.json" not in info:
                        raise FormatError(f"{what}: no config.json in the archive")
                    if info["config.json"].file_size > fk._MAX_JSON:
                        raise FormatError(f"{what}: config.json is too large")
                    config = fk._json(zf.read(info["config.json"]), f"{what}: config.json")
                weights = zf.read(info["model.weights.h5"])
        except FastLSTMError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise FormatError(f"{what}: corrupt zip archive ({exc})") from exc
        if hasattr(source, "seek"):
            source.seek(0)
        h5 = fk._open_h5(io.BytesIO(weights))
        return fk._coerce_config(config), _Weights("new", h5=h5), h5.close
    if not fk.is_hdf5(head):
        raise FormatError(f"{what}: neither a .keras archive nor an HDF5 file")
    h5 = fk._open_h5(source)
    try:
        if config is None and "model_config" in h5.attrs:
            config = fk._coerce_config(fk._json(fk._text(fk._attr(h5, "model_config")),
                                                f"{what}: model_config"))
        if config is None:
            raise FormatError(f"{what}: weights-only file: pass config= (the model's config)")
        if "model_weights" in h5:
            weights = _Weights("legacy", group=h5["model_weights"])
        elif fk._str_list_attr(h5, "layer_names") is not None:
            weights = _Weights("legacy", group=h5)
        elif "layers" in h5:
            weights = _Weights("new", h5=h5)
        else:
            raise FormatError(f"{what}: HDF5 file without Keras weights")
    except BaseException:
        h5.close()
        raise
    if hasattr(source, "seek"):
        source.seek(0)
    return config, weights, h5.close


def _plan(config):
    """Walk a Sequential config -> (embedding entry, [LSTM names], head entry,
    activation, whether the last LSTM returns sequences, Masking's mask_value
    or None)."""
    cls, cfg, layers = fk._layer_list(config, "model config")
    if not (cls == "Sequential" or isinstance(cfg, list)):
        raise FormatError(f"model config: expected a Sequential model, got {cls!r}")
    used = {}
    emb = head = mask_value = None
    lstms = []
    act = None
    last_seq = False
    for layer in layers:
        lcls = layer.get("class_name")
        name = fk._layer_name(layer)
        lcfg = layer.get("config") or {}
        if lcls == "InputLayer":
            continue
        h5 = f"layers/{fk._unique(fk._snake(str(lcls)), used)}"
        what = f"layer {name!r} ({lcls})"
        if lcls in fk._IDENTITY:
            continue
        if lcls == "Masking":
            if emb is not None or lstms or mask_value is not None:
                raise FormatError(f"{what}: a Masking layer is supported only first, on "
                                  "feature input")
            mask_value = lcfg.get("mask_value", 0.0)
            if isinstance(mask_value, bool) or not isinstance(mask_value, (int, float)):
                raise FormatError(f"{what}: mask_value {mask_value!r} is not a number")
            mask_value = float(mask_value)
        elif lcls == "Embedding":
            if emb is not None or lstms or mask_value is not None:
                raise FormatError(f"{what}: an Embedding must come first, once")
            emb = {"name": name, "h5": h5, "config": lcfg}
        elif lcls in _RECURRENT:
            if head is not None:
                raise FormatError(f"{what}: recurrent layer after the head")
            if lstms and not last_seq:
                raise FormatError(f"{what}: the previous LSTM does not return sequences")
            lstms.append(name)
            inner = lcfg.get("layer", {}).get("config", {}) if lcls == "Bidirectional" else lcfg
            last_seq = bool(inner.get("return_sequences", False))
        elif lcls in ("Dense", "TimeDistributed"):
            inner = False
            dcfg = lcfg
            if lcls == "TimeDistributed":
                sub = lcfg.get("layer") or {}
                if sub.get("class_name") != "Dense":
                    raise FormatError(f"{what}: only TimeDistributed(Dense) is supported")
                dcfg = sub.get("config") or {}
                inner = True
            if not lstms:
                raise FormatError(f"{what}: a Dense layer before the LSTM is not supported")
            if head is not None:
                raise FormatError(f"{what}: fastlstm.Network has one dense head; this model has "
                                  "several Dense layers")
            head = {"name": name, "h5": h5, "inner": inner, "config": dcfg}
            act = _act_name(dcfg.get("activation", "linear"), what)
        elif lcls in ("Activation", "Softmax"):
            if head is None or act != "none":
                raise FormatError(f"{what}: an activation is supported only right after a "
                                  "linear Dense head")
            if lcls == "Softmax":
                axis = lcfg.get("axis", -1)
                if axis not in (-1, [-1]):
                    raise FormatError(f"{what}: Softmax over axis {axis} is not supported")
                act = "softmax"
            else:
                act = _act_name(lcfg.get("activation"), what)
        else:
            raise FormatError(f"{what}: layer not supported by fastlstm.Network (Masking, "
                              "Embedding, LSTM, Bidirectional, Dense, TimeDistributed(Dense), "
                              "Activation, Dropout)")
    if not lstms:
        raise FormatError("model config: no LSTM layer")
    return emb, lstms, head, act or "none", last_seq, mask_value


def _lstms_of(stack):
    try:
        return [stack.to_lstm()]
    except FormatError:
        pass
    out = []
    for layer in stack.layers:  # a chain of single fastlstm.LSTMs, when that is faithful
        if (len(layer.lstms) != 1 or layer.go_backwards or layer.input_index != 0
                or (layer.kind == "bi" and layer.merge_mode != "concat")
                or layer.kind not in ("uni", "bi")):
            raise FormatError(f"layer {layer.name!r}: go_backwards, merge modes other than "
                              "concat and split Bidirectional layers are not supported by "
                              "fastlstm.Network")
        out.append(layer.lstms[0])
    return out


def network_from_keras(cls, source, *, config, mode, dtype, num_threads):
    conf, weights, closer = fk._guarded(lambda: _open(source, config))
    try:
        emb, lstm_names, head, act, last_seq, mask_value = fk._guarded(lambda: _plan(conf))

        def read():
            e = w = b = None
            mask_zero = False
            if emb is not None:
                arrs = weights.get(emb["name"], emb["h5"], False, f"layer {emb['name']!r}")
                if len(arrs) != 1 or arrs[0].ndim != 2:
                    raise FormatError(f"layer {emb['name']!r}: expected one (vocab, dim) "
                                      "embeddings array")
                e = arrs[0]
                mask_zero = bool(emb["config"].get("mask_zero", False))
            if head is not None:
                what = f"layer {head['name']!r}"
                arrs = weights.get(head["name"], head["h5"], head["inner"], what)
                use_bias = bool(head["config"].get("use_bias", True))
                if len(arrs) != (2 if use_bias else 1) or arrs[0].ndim != 2:
                    raise FormatError(f"{what}: expected kernel{' and bias' if use_bias else ''}")
                w = np.ascontiguousarray(arrs[0].T)
                if use_bias:
                    b = arrs[1]
                    if b.shape != (w.shape[0],):
                        raise FormatError(f"{what}: bias shape {b.shape} does not match the "
                                          f"kernel {arrs[0].shape}")
            return e, w, b, mask_zero
        e, w, b, mask_zero = fk._guarded(read)
    finally:
        if closer is not None:
            closer()
    import warnings
    with warnings.catch_warnings():
        if mask_value is not None or (emb is not None and emb["config"].get("mask_zero")):
            # Network applies the mask itself (Masking's mask_value, mask_zero's
            # tokens): the stack's warning does not apply.
            warnings.filterwarnings("ignore", message="the Keras model masks")
        stack = fk.load_keras(source, lstm_names[0], config=config, dtype=dtype,
                              num_threads=num_threads)
    if len(stack.layers) != len(lstm_names):
        raise FormatError(f"expected {len(lstm_names)} LSTM layers in one chain, the Keras "
                          f"loader found {len(stack.layers)}")
    lstms = _lstms_of(stack)
    if mode is None:
        mode = "sequence" if last_seq else "last"
    return cls(lstms if len(lstms) > 1 else lstms[0], embedding=e, head=w, head_bias=b,
               activation=act, mode=mode, batch_first=True, mask_zero=mask_zero,
               mask_value=mask_value, num_threads=num_threads)
