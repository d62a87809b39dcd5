"""fastlstm's own file format: ``LSTM.save(path)`` / ``fastlstm.load(path)``.

A safetensors file (readable by any safetensors reader, and by fastlstm with
NumPy alone) whose tensors carry torch.nn.LSTM's names (``weight_ih_l0``,
..., ``peephole_l0`` for peepholes) in the model's dtype, and whose
``__metadata__`` holds one key, ``"fastlstm"``, with the configuration as
JSON::

    {"format": "fastlstm", "version": 1, "input_size": 8, "hidden_size": 16,
     "num_layers": 1, "bias": true, "batch_first": false, "bidirectional": false,
     "proj_size": 0, "dtype": "float32", "dropout": 0.0, "peepholes": false,
     "activations": ["sigmoid", "tanh", "tanh"], "activation_alpha": [...],
     "activation_beta": [...], "clip": 0.0, "cell_clip": 0.0, "input_forget": false}

Loading round-trips exactly: same configuration, bitwise-equal weights.
"""
from __future__ import annotations

import json
import math

import numpy as np

from ..errors import FormatError, WeightsError
from . import safetensors as st

__all__ = ["save_model", "load_model", "list_stacks", "read_config", "FORMAT_NAME",
           "FORMAT_VERSION", "METADATA_KEY"]

FORMAT_NAME = "fastlstm"
FORMAT_VERSION = 1
METADATA_KEY = "fastlstm"

_CONFIG_TYPES = {
    "input_size": int, "hidden_size": int, "num_layers": int, "bias": bool,
    "batch_first": bool, "bidirectional": bool, "proj_size": int, "dtype": str,
    "dropout": float, "peepholes": bool, "activations": list, "activation_alpha": list,
    "activation_beta": list, "clip": float, "cell_clip": float, "input_forget": bool,
}
_DTYPE_CODES = {"float32": "F32", "float64": "F64"}


def model_config(model):
    """The JSON-able configuration of a fastlstm.LSTM."""
    opts = model.cell_options()
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "input_size": model.input_size, "hidden_size": model.hidden_size,
        "num_layers": model.num_layers, "bias": model.bias, "batch_first": model.batch_first,
        "bidirectional": model.bidirectional, "proj_size": model.proj_size,
        "dtype": np.dtype(model.dtype).name, "dropout": float(model.dropout),
        "peepholes": bool(opts["peepholes"]), "activations": list(opts["activations"]),
        "activation_alpha": [float(a) for a in opts["activation_alpha"]],
        "activation_beta": [float(b) for b in opts["activation_beta"]],
        "clip": float(opts["clip"]), "cell_clip": float(opts["cell_clip"]),
        "input_forget": bool(opts["input_forget"]),
    }


def save_model(model, path):
    """Write a fastlstm.LSTM (configuration and weights) to ``path``."""
    from ..model import LSTM

    if not isinstance(model, LSTM):
        raise TypeError(f"model: expected a fastlstm.LSTM, got {type(model).__name__}")
    config = model_config(model)
    meta = {METADATA_KEY: json.dumps(config, sort_keys=True)}
    st.save_file(model.state_dict(), path, metadata=meta)


def is_native(header_metadata):
    return isinstance(header_metadata, dict) and METADATA_KEY in header_metadata


def read_config(metadata, where):
    """Parse and check the configuration stored in the metadata."""
    try:
        cfg = json.loads(metadata[METADATA_KEY], parse_constant=_reject)
    except (ValueError, RecursionError, FormatError) as exc:
        raise FormatError(f"{where}: fastlstm configuration is not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise FormatError(f"{where}: fastlstm configuration is not a JSON object")
    if cfg.get("format") != FORMAT_NAME:
        raise FormatError(f"{where}: configuration format is {cfg.get('format')!r}, "
                          f"expected {FORMAT_NAME!r}")
    version = cfg.get("version")
    if type(version) is not int or version < 1:
        raise FormatError(f"{where}: bad fastlstm format version {version!r}")
    if version > FORMAT_VERSION:
        raise FormatError(f"{where}: written by a newer fastlstm (format version {version}); "
                          f"this one reads version {FORMAT_VERSION}")
    out = {}
    for key, typ in _CONFIG_TYPES.items():
        if key not in cfg:
            raise FormatError(f"{where}: fastlstm configuration lacks {key!r}")
        v = cfg[key]
        ok = (type(v) is typ or (typ is float and type(v) is int))
        if typ is list:
            ok = isinstance(v, list) and len(v) == 3 and all(
                isinstance(x, str) if key == "activations" else type(x) in (int, float)
                for x in v)
        if not ok:
            raise FormatError(f"{where}: fastlstm configuration {key!r} = {str(v)[:40]} has "
                              f"the wrong type")
        try:
            if typ is float:
                v = float(v)
            elif key in ("activation_alpha", "activation_beta"):
                v = [float(x) for x in v]
        except OverflowError as exc:
            raise FormatError(f"{where}: configuration {key!r} out of range") from exc
        out[key] = v
    if out["dtype"] not in _DTYPE_CODES:
        raise FormatError(f"{where}: configuration dtype {out['dtype']!r} is not float32 or "
                          f"float64")
    for key in ("input_size", "hidden_size", "num_layers", "proj_size"):
        if out[key] < (1 if key in ("hidden_size", "num_layers") else 0):
            raise FormatError(f"{where}: configuration {key} = {out[key]} out of range")
    from ..model import ACTIVATIONS
    if not 0.0 <= out["dropout"] <= 1.0:
        raise FormatError(f"{where}: configuration dropout {out['dropout']} not in [0, 1]")
    for key in ("clip", "cell_clip"):
        if not 0.0 <= out[key] < math.inf:
            raise FormatError(f"{where}: configuration {key} {out[key]} is not finite and >= 0")
    for a in out["activations"]:
        if a not in ACTIVATIONS:
            raise FormatError(f"{where}: configuration names unknown activation {a!r}")
    for key in ("activation_alpha", "activation_beta"):
        if not all(math.isfinite(v) for v in out[key]):
            raise FormatError(f"{where}: configuration {key} holds a non-finite value")
    if out["proj_size"] >= out["hidden_size"]:
        raise FormatError(f"{where}: configuration proj_size {out['proj_size']} >= hidden_size")
    return out


def _reject(name):
    raise FormatError(f"non-finite number {name}")


def _expected_shapes(cfg):
    H, P = cfg["hidden_size"], cfg["proj_size"]
    Hout, D = P or H, 2 if cfg["bidirectional"] else 1
    shapes = {}
    for layer in range(cfg["num_layers"]):
        In = cfg["input_size"] if layer == 0 else D * Hout
        for d in range(D):
            s = f"l{layer}" + ("_reverse" if d else "")
            shapes["weight_ih_" + s] = (4 * H, In)
            shapes["weight_hh_" + s] = (4 * H, Hout)
            if cfg["bias"]:
                shapes["bias_ih_" + s] = (4 * H,)
                shapes["bias_hh_" + s] = (4 * H,)
            if P:
                shapes["weight_hr_" + s] = (P, H)
            if cfg["peepholes"]:
                shapes["peephole_" + s] = (3, H)
    return shapes


def _check(f, where):
    """Config and tensor table of an open native file; nothing allocated."""
    cfg = read_config(f.metadata, where)
    if cfg["num_layers"] > 4096:
        raise FormatError(f"{where}: num_layers {cfg['num_layers']} too large")
    from .stacks import check_sizes
    check_sizes(cfg, where)
    shapes = _expected_shapes(cfg)
    missing = sorted(set(shapes) - set(f.infos))
    extra = sorted(set(f.infos) - set(shapes))
    if missing or extra:
        raise FormatError(f"{where}: tensors do not match the configuration: missing "
                          f"{missing[:6]}, unexpected {extra[:6]}")
    code = _DTYPE_CODES[cfg["dtype"]]
    for name, shape in shapes.items():
        info = f.infos[name]
        if info.shape != shape:
            raise FormatError(f"{where}: tensor {name!r} has shape {info.shape}, the "
                              f"configuration needs {shape}")
        if info.dtype != code:
            raise FormatError(f"{where}: tensor {name!r} is {info.dtype}, the configuration "
                              f"dtype is {cfg['dtype']}")
    return cfg


def _variant(cfg):
    parts = []
    if cfg["peepholes"]:
        parts.append("peepholes")
    if tuple(cfg["activations"]) != ("sigmoid", "tanh", "tanh"):
        parts.append("activations")
    for key in ("clip", "cell_clip", "input_forget"):
        if cfg[key]:
            parts.append(key)
    return ",".join(parts) or "standard"


def list_stacks(path):
    with st.SafetensorsFile(path) as f:
        cfg = _check(f, f.where)
    info = {"format": FORMAT_NAME, "kind": "LSTM", "input_size": cfg["input_size"],
            "hidden_size": cfg["hidden_size"], "proj_size": cfg["proj_size"],
            "num_layers": cfg["num_layers"], "num_directions": 2 if cfg["bidirectional"] else 1,
            "bidirectional": cfg["bidirectional"], "bias": cfg["bias"], "dtype": cfg["dtype"],
            "variant": _variant(cfg), "batch_first": cfg["batch_first"],
            "cell_options": {k: cfg[k] for k in ("peepholes", "activations",
                                                 "activation_alpha", "activation_beta",
                                                 "clip", "cell_clip", "input_forget")}}
    return [("", info)]


def load_model(path, name=None, *, batch_first=None, dtype=None, num_threads=None):
    """Load a model written by ``LSTM.save``.  ``batch_first``, ``dtype``
    and ``num_threads`` override the stored values when given (the weights
    round-trip bitwise unless ``dtype`` changes them)."""
    from ..model import LSTM

    with st.SafetensorsFile(path) as f:
        where = f.where
        if not is_native(f.metadata):
            raise FormatError(f"{where}: not a fastlstm file (no 'fastlstm' metadata)")
        if name not in (None, ""):
            raise FormatError(f"{where}: a fastlstm file holds one stack, named ''; got "
                              f"name={name!r}")
        cfg = _check(f, where)
        arrays = {k: f.get(k) for k in f.infos}
    opts = {k: cfg[k] for k in ("peepholes", "activations", "activation_alpha",
                                "activation_beta", "input_forget")}
    opts["clip"] = cfg["clip"] or None
    opts["cell_clip"] = cfg["cell_clip"] or None
    try:
        model = LSTM(cfg["input_size"], cfg["hidden_size"], num_layers=cfg["num_layers"],
                     bias=cfg["bias"],
                     batch_first=cfg["batch_first"] if batch_first is None else batch_first,
                     dropout=cfg["dropout"], bidirectional=cfg["bidirectional"],
                     proj_size=cfg["proj_size"],
                     dtype=np.dtype(cfg["dtype"]) if dtype is None else dtype,
                     num_threads=num_threads, **opts)
        model.load_state_dict(arrays, strict=True)
    except (ValueError, TypeError, WeightsError) as exc:
        if dtype is not None or num_threads is not None:
            raise  # may be the caller's argument, not the file
        raise FormatError(f"{where}: invalid fastlstm configuration ({exc})") from exc
    return model
