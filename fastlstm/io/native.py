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

Reduced-precision models (``LSTM.astype("float16" | "bfloat16" | "int8")``)
are written with ``"version": 2`` and ``"weights_precision"`` in the
configuration, and their recurrent weights in the stored precision:

* ``float16``: ``weight_hh_*`` as F16 tensors;
* ``bfloat16``: ``weight_hh_*`` as BF16 tensors;
* ``int8``: no ``weight_hh_*``; instead ``weight_hh_*.int8`` (I8, shape
  (4*hidden, hidden_or_proj)) and ``weight_hh_*.scale`` (F32, shape
  (4*hidden,)), with W_hh = int8 * scale[:, None] (one scale per row).

int8 models whose input weights are int8 too (``astype("int8")``, the
default since format version 3) or whose activations are quantized to 8
bits are written with ``"version": 3``, ``"input_weights_precision"``
("int8" or "float32") and ``"activation_bits"`` (16 or 8); int8 input
weights are stored the same way, ``weight_ih_*.int8`` and
``weight_ih_*.scale`` (a layer with no inputs keeps an empty F32
``weight_ih_*``).  Version 2 files mean float32 input weights and 16-bit
activations.

bfloat16 models with bfloat16 input weights or whose dot products round
their activations to bfloat16 (``astype("bfloat16")``'s defaults) are
written with ``"version": 4``, ``"input_weights_precision"`` ("bfloat16" or
"float32") and ``"activation_bits"`` (16: h and the inputs rounded to
bfloat16, or 32: float32); bfloat16 input weights are stored as BF16
``weight_ih_*`` tensors.  bfloat16 models with float32 input weights and
activations keep version 2, which means that.

Everything else stays F32.  Loading restores the same stored weights bit for
bit (``quantized_weights()`` equal, outputs bitwise equal).  Files of
float32 models keep version 1 and int8 models with float32 input weights
and 16-bit codes version 2, so older fastlstm versions still read what they can compute;
they refuse newer versions with a clear message.
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
FORMAT_VERSION = 4  # the newest version this module reads; float32 models are written as 1
METADATA_KEY = "fastlstm"

_CONFIG_TYPES = {
    "input_size": int, "hidden_size": int, "num_layers": int, "bias": bool,
    "batch_first": bool, "bidirectional": bool, "proj_size": int, "dtype": str,
    "dropout": float, "peepholes": bool, "activations": list, "activation_alpha": list,
    "activation_beta": list, "clip": float, "cell_clip": float, "input_forget": bool,
}
_DTYPE_CODES = {"float32": "F32", "float64": "F64"}
# weights_precision -> safetensors dtype of W_hh (int8: the codes; scales are F32)
_PRECISION_CODES = {"float16": "F16", "bfloat16": "BF16", "int8": "I8"}
INT8_SUFFIX = ".int8"
SCALE_SUFFIX = ".scale"


def model_config(model):
    """The JSON-able configuration of a fastlstm.LSTM."""
    opts = model.cell_options()
    cfg = {
        "format": FORMAT_NAME, "version": 1,
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
    prec = getattr(model, "weights_precision", "float32")
    if prec != "float32":
        cfg["version"] = 2
        cfg["weights_precision"] = prec
    in_prec = getattr(model, "input_weights_precision", "float32")
    bits = getattr(model, "activation_bits", 16 if prec == "int8" else 32)
    if prec == "int8" and (in_prec != "float32" or bits != 16):
        cfg["version"] = 3
    elif prec == "bfloat16" and (bits == 16 or in_prec != "float32"):
        cfg["version"] = 4
    if cfg["version"] >= 3:
        cfg["input_weights_precision"] = in_prec
        cfg["activation_bits"] = bits
    return cfg


def save_model(model, path):
    """Write a fastlstm.LSTM (configuration and weights) to ``path``."""
    from ..model import LSTM

    if not isinstance(model, LSTM):
        raise TypeError(f"model: expected a fastlstm.LSTM, got {type(model).__name__}")
    config = model_config(model)
    meta = {METADATA_KEY: json.dumps(config, sort_keys=True)}
    tensors = model.state_dict()
    dtypes = {}
    for name, qf in model.quantized_weights().items():
        prec, data = qf[0], qf[1]
        if prec == "float16":
            tensors[name] = np.asarray(data, np.uint16).view(np.float16)
        elif prec == "bfloat16":
            tensors[name] = np.asarray(data, np.uint16)
            dtypes[name] = "BF16"
        else:
            del tensors[name]
            tensors[name + INT8_SUFFIX] = np.asarray(data, np.int8)
            tensors[name + SCALE_SUFFIX] = np.asarray(qf[2], np.float32)
    st.save_file(tensors, path, metadata=meta, dtypes=dtypes)


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
    prec = cfg.get("weights_precision", "float32") if version >= 2 else "float32"
    if version >= 2 and "weights_precision" not in cfg:
        raise FormatError(f"{where}: fastlstm configuration lacks 'weights_precision'")
    if not isinstance(prec, str) or (prec != "float32" and prec not in _PRECISION_CODES):
        raise FormatError(f"{where}: configuration weights_precision {str(prec)[:40]!r} is not "
                          f"one of {['float32'] + sorted(_PRECISION_CODES)}")
    out["weights_precision"] = prec
    in_prec = cfg.get("input_weights_precision", "float32") if version >= 3 else "float32"
    if version >= 3 and "input_weights_precision" not in cfg:
        raise FormatError(f"{where}: fastlstm configuration lacks 'input_weights_precision'")
    in_allowed = ("float32", "int8") if prec == "int8" else (
        ("float32", "bfloat16") if prec == "bfloat16" and version >= 4 else ("float32",))
    if in_prec not in in_allowed:
        raise FormatError(f"{where}: configuration input_weights_precision {str(in_prec)[:40]!r} "
                          f"is not one of {list(in_allowed)} with weights_precision {prec} "
                          f"(format version {version})")
    out["input_weights_precision"] = in_prec
    # Versions before 4 knew activation_bits for int8 only (16 or 8); every
    # other precision multiplied float32 activations (32 now).
    allowed = ((8, 16) if prec == "int8" else (16, 32) if prec == "bfloat16" and version >= 4
               else (32,))
    if version >= 3 and "activation_bits" not in cfg:
        raise FormatError(f"{where}: fastlstm configuration lacks 'activation_bits'")
    bits = cfg["activation_bits"] if version >= 3 else 16 if prec == "int8" else 32
    if prec != "int8" and version == 3 and bits == 16:
        bits = 32  # version 3 wrote 16 for "float32 activations"
    if type(bits) is not int or bits not in allowed:
        raise FormatError(f"{where}: configuration activation_bits {str(bits)[:40]!r} is not "
                          f"one of {list(allowed)} with weights_precision {prec} (format version "
                          f"{version})")
    out["activation_bits"] = bits
    if prec != "float32" and out["dtype"] != "float32":
        raise FormatError(f"{where}: weights_precision {prec} needs dtype float32, the "
                          f"configuration says {out['dtype']!r}")
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


def _expected_tensors(cfg):
    """name -> (shape, safetensors dtype) of every tensor the file must hold."""
    code = _DTYPE_CODES[cfg["dtype"]]
    prec = cfg["weights_precision"]
    out = {}
    for name, shape in _expected_shapes(cfg).items():
        if name.startswith("weight_ih_") and cfg["input_weights_precision"] == "int8" and shape[1]:
            out[name + INT8_SUFFIX] = (shape, "I8")
            out[name + SCALE_SUFFIX] = (shape[:1], "F32")
        elif (name.startswith("weight_ih_") and cfg["input_weights_precision"] == "bfloat16"
              and shape[1]):
            out[name] = (shape, "BF16")
        elif prec == "float32" or not name.startswith("weight_hh_"):
            out[name] = (shape, code)
        elif prec == "int8":
            out[name + INT8_SUFFIX] = (shape, "I8")
            out[name + SCALE_SUFFIX] = (shape[:1], "F32")
        else:
            out[name] = (shape, _PRECISION_CODES[prec])
    return out


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
    expected = _expected_tensors(cfg)
    missing = sorted(set(expected) - set(f.infos))
    extra = sorted(set(f.infos) - set(expected))
    if missing or extra:
        raise FormatError(f"{where}: tensors do not match the configuration: missing "
                          f"{missing[:6]}, unexpected {extra[:6]}")
    for name, (shape, code) in expected.items():
        info = f.infos[name]
        if info.shape != shape:
            raise FormatError(f"{where}: tensor {name!r} has shape {info.shape}, the "
                              f"configuration needs {shape}")
        if info.dtype != code:
            what = (f"weights_precision is {cfg['weights_precision']}"
                    if code != _DTYPE_CODES[cfg["dtype"]] else f"dtype is {cfg['dtype']}")
            raise FormatError(f"{where}: tensor {name!r} is {info.dtype}, the configuration "
                              f"{what} (needs {code})")
    return cfg


def _read_reduced(f, cfg, where):
    """Weights of a reduced-precision file: (float32 state dict with the
    dequantized W_hh (and int8 W_ih), {name: qform as
    LSTM.quantized_weights() gives})."""
    prec = cfg["weights_precision"]
    arrays, qforms = {}, {}
    for name in f.infos:
        if name.endswith(SCALE_SUFFIX):
            continue
        if name.endswith(INT8_SUFFIX):
            base = name[:-len(INT8_SUFFIX)]
            q = np.array(f.get(name), dtype=np.int8, order="C")
            scale = np.array(f.get(base + SCALE_SUFFIX), dtype=np.float32, order="C")
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                raise FormatError(f"{where}: tensor {base + SCALE_SUFFIX!r} holds scales that "
                                  f"are not finite and > 0")
            qforms[base] = (prec, q, scale)
            # the same float32 arithmetic as LSTM.astype's quantizer
            arrays[base] = (q.astype(np.float32) * scale[:, None]).astype(np.float32)
        elif name.startswith("weight_hh_") and prec == "float16":
            h = np.array(f.get(name), dtype=np.float16, order="C")
            qforms[name] = (prec, h.view(np.uint16))
            arrays[name] = h.astype(np.float32)
        elif (name.startswith("weight_hh_") or (name.startswith("weight_ih_") and
              cfg["input_weights_precision"] == "bfloat16" and f.infos[name].shape[1])) \
                and prec == "bfloat16":
            wide = np.array(f.get(name), dtype=np.float32, order="C")  # exact widening
            qforms[name] = (prec, np.ascontiguousarray(
                (wide.view(np.uint32) >> 16).astype(np.uint16)))
            arrays[name] = wide
        else:
            arrays[name] = f.get(name)
    return arrays, qforms


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
            "weights_precision": cfg["weights_precision"],
            "input_weights_precision": cfg["input_weights_precision"],
            "activation_bits": cfg["activation_bits"],
            "variant": _variant(cfg), "batch_first": cfg["batch_first"],
            "cell_options": {k: cfg[k] for k in ("peepholes", "activations",
                                                 "activation_alpha", "activation_beta",
                                                 "clip", "cell_clip", "input_forget")}}
    return [("", info)]


def load_model(path, name=None, *, batch_first=None, dtype=None, num_threads=None):
    """Load a model written by ``LSTM.save``.  ``batch_first``, ``dtype``
    and ``num_threads`` override the stored values when given (the weights
    round-trip bitwise unless ``dtype`` changes them).  A reduced-precision
    file loads as a model with the same ``weights_precision`` and the same
    stored weights (a float64 ``dtype`` is refused for it: DTypeError)."""
    from ..model import LSTM

    with st.SafetensorsFile(path) as f:
        where = f.where
        if not is_native(f.metadata):
            raise FormatError(f"{where}: not a fastlstm file (no 'fastlstm' metadata)")
        if name not in (None, ""):
            raise FormatError(f"{where}: a fastlstm file holds one stack, named ''; got "
                              f"name={name!r}")
        cfg = _check(f, where)
        if cfg["weights_precision"] == "float32":
            arrays, qforms = {k: f.get(k) for k in f.infos}, {}
        else:
            arrays, qforms = _read_reduced(f, cfg, where)
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
    if qforms:
        # The stored codes are the truth (re-quantizing the dequantized values
        # need not give the same int8 scales bit for bit): hand them to astype,
        # which keeps a W_hh already stored in the requested precision.
        model._qforms = qforms
        model = model.astype(cfg["weights_precision"],
                             input_weights=cfg["input_weights_precision"],
                             activation_bits=cfg["activation_bits"])
    return model
