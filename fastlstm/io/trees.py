"""LSTMs from the parameter trees of TF1, Flax and Haiku, and Equinox cells.

A parameter tree is a mapping of names to arrays, nested mappings allowed
(``{"params": {"cell": {"ii": {"kernel": ...}}}}``) and names may already
hold slashes (``"rnn/lstm_cell/kernel:0"``, Haiku's ``"lstm/linear"``).  It is
flattened with "/" and a trailing ":0" is dropped.  Leaves may be NumPy, JAX,
torch or TensorFlow arrays, or Flax NNX variables (their ``.value``).

Each function returns a ``fastlstm.LSTM`` (PyTorch semantics: input (T, N, In),
or (N, T, In) with ``batch_first=True``; ``hx = (h_0, c_0)``).  The frameworks
order their recurrent state differently:

* TF1 ``LSTMStateTuple`` is **(c, h)**;
* Flax's carry is **(c, h)**;
* Haiku's ``LSTMState`` is **(hidden, cell)**, i.e. (h, c);
* Equinox's ``LSTMCell`` hidden state is **(h, c)**;
* fastlstm (like PyTorch) takes and returns **(h, c)**, each
  (num_layers * num_directions, N, ·): for one cell ``hx = (h[None], c[None])``.

``prefix`` picks the cell when a tree holds several: a path such as
``"rnn/lstm_cell"``.  A list of prefixes builds a stacked LSTM (layer k reads
layer k-1's output); a list of ``(forward, backward)`` pairs builds a
bidirectional one (the backward cell runs over the reversed sequence and its
outputs are returned in time order, concatenated after the forward ones, as
``tf.nn.bidirectional_dynamic_rnn`` and ``torch.nn.LSTM`` do).  Every cell of
one LSTM must have the same sizes and options.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import FormatError
from ..model import LSTM

__all__ = ["flatten_tree", "from_tf1_cell", "from_tf1_block_cell", "from_flax_lstm_cell",
           "from_flax_optimized_lstm_cell", "from_haiku_lstm", "from_equinox_lstm_cell",
           "list_cells"]

_MAX_DEPTH = 64


# ------------------------------------------------------------------ trees
def _is_leaf(v):
    return hasattr(v, "shape") and hasattr(v, "dtype")


def _to_numpy(v, name):
    if hasattr(v, "detach") and hasattr(v, "cpu"):  # torch
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        v = v.numpy()
    elif hasattr(v, "numpy") and not isinstance(v, np.ndarray) and callable(v.numpy):
        v = v.numpy()  # TensorFlow
    try:
        arr = np.asarray(v)
    except Exception as exc:  # noqa: BLE001
        raise FormatError(f"{name}: cannot be read as an array ({exc})") from exc
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        raise FormatError(f"{name}: expected floating-point weights, got dtype {arr.dtype}")
    if arr.dtype.name == "bfloat16":
        arr = arr.astype(np.float32)
    return arr


def flatten_tree(tree):
    """Flatten a nested mapping of arrays to ``{"a/b/c": array}``.

    Keys are joined with "/", a trailing ":0" (TF variable names) is dropped,
    mappings (dict, FrozenDict, Flax NNX State) are walked, other objects
    with ``to_pure_dict()`` are expanded and leaves with a ``.value`` (NNX
    variables) are unwrapped.  Leaves stay as given
    (not converted)."""
    out = {}

    def walk(node, path, depth):
        if depth > _MAX_DEPTH:
            raise FormatError(f"parameter tree deeper than {_MAX_DEPTH} levels at {path!r}")
        if not isinstance(node, Mapping) and callable(getattr(node, "to_pure_dict", None)):
            node = node.to_pure_dict()
        if not _is_leaf(node) and hasattr(node, "value") and _is_leaf(node.value):
            node = node.value
        if _is_leaf(node):
            if not path:
                raise FormatError("parameter tree: expected a mapping of names to arrays, got "
                                  "a bare array")
            key = path[:-2] if path.endswith(":0") else path
            if key in out:
                raise FormatError(f"parameter tree: two leaves named {key!r}")
            out[key] = node
            return
        if isinstance(node, Mapping):
            for k, v in node.items():
                if not isinstance(k, str):
                    k = str(k)
                walk(v, f"{path}/{k}" if path else k, depth + 1)
            return
        raise FormatError(f"parameter tree: {path or '<root>'!r} is a {type(node).__name__}, "
                          "neither a mapping nor an array")

    walk(tree, "", 0)
    return out


def _join(prefix, name):
    return f"{prefix}/{name}" if prefix else name


def _prefixes(flat, marker):
    """Cell prefixes: paths P such that P/marker is a leaf ('' for the root)."""
    found = []
    for key in flat:
        if key == marker:
            found.append("")
        elif key.endswith("/" + marker):
            found.append(key[: -len(marker) - 1])
    return sorted(set(found))


def _layout(prefix, candidates, what):
    """Normalise `prefix` into [[prefix per direction] per layer]."""
    if prefix is None:
        if len(candidates) == 1:
            return [[candidates[0]]]
        if not candidates:
            raise FormatError(f"{what}: no cell found in the parameter tree")
        raise FormatError(f"{what}: the tree holds {len(candidates)} cells, pass prefix= one of "
                          f"{candidates} (or a list of them for a stacked LSTM)")
    layers = _per_layer(prefix, "prefix", lambda p: isinstance(p, str), "a str", TypeError)
    return [[p.strip("/") for p, _ in layer] for layer in layers]


def _per_layer(value, arg, is_one, one, err):
    """One entry, a list of entries (stacked layers) or a list of (forward,
    backward) pairs (bidirectional layers) -> [[(entry, its name in
    messages) per direction] per layer].  `is_one` tells an entry; a value
    of another form raises `err`, a mix of the two layer kinds ValueError."""
    if is_one(value):
        return [[(value, arg)]]
    if not isinstance(value, (list, tuple)) or not value:
        raise err(f"{arg}: expected {one}, a list of them or a list of (forward, backward) "
                  "pairs" + (", got an empty list" if isinstance(value, (list, tuple)) else
                             f", got {type(value).__name__}"))
    layers = []
    for k, item in enumerate(value):
        if is_one(item):
            layers.append([(item, f"{arg}[{k}]")])
        elif isinstance(item, (list, tuple)) and len(item) == 2 and all(map(is_one, item)):
            layers.append([(item[0], f"{arg}[{k}][0]"), (item[1], f"{arg}[{k}][1]")])
        else:
            got = (f"{len(item)} items" if isinstance(item, (list, tuple))
                   else type(item).__name__)
            raise err(f"{arg}[{k}]: expected {one} or a (forward, backward) pair of them, "
                      f"got {got}")
    if len({len(layer) for layer in layers}) != 1:
        raise ValueError(f"{arg}: mix of unidirectional and bidirectional layers")
    return layers


def list_cells(tree):
    """The cells found in a parameter tree: ``{framework: [prefix, ...]}``
    for 'tf1', 'flax', 'flax_nnx_optimized' and 'haiku' (a tree may match
    several: Haiku's ``w``/``b`` are generic names)."""
    flat = flatten_tree(tree)
    return {"tf1": _tf1_candidates(flat), "flax": _flax_candidates(flat),
            "flax_nnx_optimized": _prefixes(flat, "dense_i/kernel"),
            "haiku": _haiku_candidates(flat)}


# ---------------------------------------------------------------- assembly
def _get(flat, key, what, ndim=None):
    if key not in flat:
        raise FormatError(f"{what}: missing {key!r}")
    arr = _to_numpy(flat[key], key)
    if ndim is not None and arr.ndim != ndim:
        raise FormatError(f"{what}: {key!r} has shape {arr.shape}, expected {ndim}-D")
    return arr


# Activation names as JAX / TF spell them -> (fastlstm name, alpha, beta).
_ACT_ALIASES = {"sigmoid": ("sigmoid", None, None), "tanh": ("tanh", None, None),
                "relu": ("relu", None, None), "elu": ("elu", 1.0, None),
                "softsign": ("softsign", None, None), "soft_sign": ("softsign", None, None),
                "softplus": ("softplus", None, None), "leaky_relu": ("leakyrelu", 0.01, None),
                # jax.nn.hard_sigmoid is relu6(x + 3) / 6
                "hard_sigmoid": ("hardsigmoid", 1.0 / 6.0, 0.5),
                "identity": ("affine", 1.0, 0.0), "linear": ("affine", 1.0, 0.0)}


def _activation(name, what):
    if callable(name):
        name = getattr(name, "__name__", repr(name))
    key = str(name).lower()
    if key not in _ACT_ALIASES:
        raise ValueError(f"{what}: activation {name!r} has no fastlstm equivalent; "
                         f"known: {sorted(_ACT_ALIASES)}")
    return _ACT_ALIASES[key]


def _act_opts(gate, act):
    """Constructor options for gate activation `gate` (i, f, o) and cell
    activation `act` (candidate and output), each (name, alpha, beta)."""
    if (gate[0], act[0]) == ("sigmoid", "tanh"):
        return {}
    return {"activations": (gate[0], act[0], act[0]),
            "activation_alpha": (gate[1], act[1], act[1]),
            "activation_beta": (gate[2], act[2], act[2])}


def _build(cells, opts, *, batch_first, dtype, num_threads, what):
    """cells: [[cell per direction] per layer]; a cell is a dict with w_ih (4H, In),
    w_hh (4H, Hout), b (4H) or None, w_hr (P, H) or None, peep (3, H) or None."""
    first = cells[0][0]
    H = first["w_hh"].shape[0] // 4
    P = first["w_hr"].shape[0] if first["w_hr"] is not None else 0
    Hout = P or H
    D = len(cells[0])
    has_bias = first["b"] is not None
    has_peep = first["peep"] is not None
    sd = {}
    for k, layer in enumerate(cells):
        want_in = first["w_ih"].shape[1] if k == 0 else D * Hout
        for d, c in enumerate(layer):
            where = f"{what}: layer {k}{' backward' if d else ''} ({c['name']!r})"
            shapes = {"w_ih": (4 * H, want_in), "w_hh": (4 * H, Hout)}
            for name, shape in shapes.items():
                if c[name].shape != shape:
                    raise FormatError(f"{where}: {c['label'][name]} gives {c[name].shape[::-1]}"
                                      f" after conversion, expected {shape[::-1]} "
                                      "(cells of one LSTM must match in size)")
            if (c["b"] is not None) != has_bias or (c["peep"] is not None) != has_peep:
                raise FormatError(f"{where}: bias/peepholes differ from the first cell")
            if (c["w_hr"].shape if c["w_hr"] is not None else None) != \
                    (first["w_hr"].shape if first["w_hr"] is not None else None):
                raise FormatError(f"{where}: projection differs from the first cell")
            s = f"l{k}" + ("_reverse" if d else "")
            sd["weight_ih_" + s] = c["w_ih"]
            sd["weight_hh_" + s] = c["w_hh"]
            if has_bias:
                sd["bias_ih_" + s] = c["b"]
                sd["bias_hh_" + s] = np.zeros_like(c["b"])
            if P:
                sd["weight_hr_" + s] = c["w_hr"]
            if has_peep:
                sd["peephole_" + s] = c["peep"]
    if dtype is None:
        dtype = np.float64 if first["w_ih"].dtype == np.float64 else np.float32
    model = LSTM(first["w_ih"].shape[1], H, num_layers=len(cells), bias=has_bias,
                 batch_first=batch_first, bidirectional=D == 2, proj_size=P, dtype=dtype,
                 num_threads=num_threads, peepholes=has_peep, **opts)
    model.load_state_dict(sd)
    return model


def _blocks(a, order, axis):
    """Reorder the four gate blocks of `a` along `axis` from `order` (a string
    such as 'ijfo') to i, f, g, o."""
    parts = np.split(a, 4, axis=axis)
    pos = {g: k for k, g in enumerate(order)}
    return np.concatenate([parts[pos[g]] for g in "ifgo"], axis=axis)


# ---------------------------------------------------------------------- TF1
_FLAX_DENSES = {"ii", "if", "if_", "ig", "io", "hi", "hf", "hg", "ho", "dense_i", "dense_h"}


def _tf1_candidates(flat):
    out = []
    for marker in ("kernel", "weights"):
        for p in _prefixes(flat, marker):
            last = p.rsplit("/", 1)[-1]
            if last == "projection" or last in _FLAX_DENSES:
                continue
            bkey = next((_join(p, n) for n in ("bias", "biases") if _join(p, n) in flat), None)
            if bkey is None:
                continue
            k, b = getattr(flat[_join(p, marker)], "shape", ()), getattr(flat[bkey], "shape", ())
            if len(k) == 2 and len(b) == 1 and k[1] == b[0] and k[1] and k[1] % 4 == 0:
                out.append(p)
    return sorted(set(out))


def _tf1_cell(flat, prefix, forget_bias, what):
    def pick(*names):
        for n in names:
            if _join(prefix, n) in flat:
                return _join(prefix, n)
        raise FormatError(f"{what}: no {' or '.join(_join(prefix, n) for n in names)!r} "
                          "in the parameter tree")

    kkey, bkey = pick("kernel", "weights"), pick("bias", "biases")
    kernel = _get(flat, kkey, what, 2)
    bias = _get(flat, bkey, what, 1)
    if kernel.shape[1] % 4 or kernel.shape[1] == 0:
        raise FormatError(f"{what}: {kkey!r} has shape {kernel.shape}, expected (In+H, 4U)")
    U = kernel.shape[1] // 4
    if bias.shape != (4 * U,):
        raise FormatError(f"{what}: {bkey!r} has shape {bias.shape}, expected ({4 * U},)")
    w_hr = None
    pkey = next((_join(prefix, n) for n in ("projection/kernel", "projection/weights")
                 if _join(prefix, n) in flat), None)
    if pkey is not None:
        proj = _get(flat, pkey, what, 2)
        if proj.shape[0] != U or not 0 < proj.shape[1] < U:
            raise FormatError(f"{what}: {pkey!r} has shape {proj.shape}, expected (U={U}, P) "
                              "with 0 < P < U")
        w_hr = np.ascontiguousarray(proj.T)
    Hout = w_hr.shape[0] if w_hr is not None else U
    In = kernel.shape[0] - Hout
    if In < 0:
        raise FormatError(f"{what}: {kkey!r} has {kernel.shape[0]} rows, fewer than the "
                          f"state size {Hout}")
    diag = [_join(prefix, n) for n in ("w_i_diag", "w_f_diag", "w_o_diag")]
    present = [k in flat for k in diag]
    peep = None
    if any(present):
        if not all(present):
            raise FormatError(f"{what}: peepholes need all of {diag}")
        peep = np.stack([_get(flat, k, what, 1) for k in diag])
        if peep.shape != (3, U):
            raise FormatError(f"{what}: peephole weights must be ({U},) each")
    # TF1 gate blocks: i, j (candidate), f, o.
    W = _blocks(kernel, "igfo", axis=1)  # j is the candidate g
    b = _blocks(bias.astype(np.float64), "igfo", axis=0)
    b[U:2 * U] += float(forget_bias)
    return {"name": prefix, "w_ih": np.ascontiguousarray(W[:In].T),
            "w_hh": np.ascontiguousarray(W[In:].T), "b": b, "w_hr": w_hr, "peep": peep,
            "label": {"w_ih": f"{kkey} rows [:In]", "w_hh": f"{kkey} rows [In:]"}}


def from_tf1_cell(params, *, forget_bias=1.0, cell_clip=None, activation="tanh", prefix=None,
                  batch_first=False, dtype=None, num_threads=None):
    """A fastlstm.LSTM from TF1 ``BasicLSTMCell`` / ``LSTMCell`` variables.

    Variables under a cell's scope: ``kernel`` (In + H_out, 4U) applied to
    [x, h] (older TF: ``weights``), ``bias`` (4U) (``biases``), gate blocks
    i, j (candidate), f, o; with ``use_peepholes``: ``w_i_diag``,
    ``w_f_diag``, ``w_o_diag`` (U,) (i and f look at c_{t-1}, o at the new,
    clipped c_t); with ``num_proj``: ``projection/kernel`` (U, P), so
    H_out = P.  ``forget_bias`` (TF default 1.0) is added to the f gate at run
    time by TF and is not stored: pass the value the cell was built with.
    ``cell_clip`` clamps c_t (LSTMCell's cell_clip); ``proj_clip`` has no
    fastlstm equivalent.  ``activation`` is the cell's activation (tanh).

    State: TF1's ``LSTMStateTuple`` is (c, h); fastlstm takes ``hx=(h, c)``.
    """
    flat = flatten_tree(params)
    layout = _layout(prefix, _tf1_candidates(flat), "TF1 LSTMCell")
    cells = [[_tf1_cell(flat, p, forget_bias, "TF1 LSTMCell") for p in layer]
             for layer in layout]
    opts = _act_opts(_ACT_ALIASES["sigmoid"], _activation(activation, "activation"))
    opts["cell_clip"] = cell_clip
    return _build(cells, opts, batch_first=batch_first, dtype=dtype, num_threads=num_threads,
                  what="TF1 LSTMCell")


def from_tf1_block_cell(params, *, forget_bias=1.0, cell_clip=None, prefix=None,
                        batch_first=False, dtype=None, num_threads=None):
    """A fastlstm.LSTM from TF1 ``LSTMBlockCell`` / ``LSTMBlockFusedCell``
    (the ``BlockLSTM`` op) variables: ``kernel`` (In + H, 4H) over [x, h],
    ``bias`` (4H), gate blocks i, c (candidate), f, o, optional peepholes
    ``w_i_diag``, ``w_f_diag``, ``w_o_diag``.  ``forget_bias`` (1.0) is added
    at run time.  ``cell_clip``: the op's attr clamps c_t; old TF versions
    defaulted it to 3.0 and ``LSTMBlockCell(cell_clip=None)`` means no clip:
    pass what the model ran with.  State order (c, h) as in TF1."""
    return from_tf1_cell(params, forget_bias=forget_bias, cell_clip=cell_clip, prefix=prefix,
                         batch_first=batch_first, dtype=dtype, num_threads=num_threads)


# --------------------------------------------------------------------- Flax
def _flax_candidates(flat):
    return _prefixes(flat, "ii/kernel")


def _flax_cell(flat, prefix, what):
    def k(name):
        return _join(prefix, name)

    kernels_i, kernels_h, biases = [], [], []
    for gate in "ifgo":
        ni = f"i{gate}"
        if gate == "f" and k("if/kernel") not in flat and k("if_/kernel") in flat:
            ni = "if_"  # Flax NNX names the attribute if_
        nh = f"h{gate}"
        wi = _get(flat, k(f"{ni}/kernel"), what, 2)
        wh = _get(flat, k(f"{nh}/kernel"), what, 2)
        if k(f"{ni}/bias") in flat:
            raise FormatError(f"{what}: {k(ni + '/bias')!r}: Flax's input denses have no bias")
        kernels_i.append(wi)
        kernels_h.append(wh)
        bkey = k(f"{nh}/bias")
        biases.append(_get(flat, bkey, what, 1) if bkey in flat else None)
    H = kernels_h[0].shape[1]
    In = kernels_i[0].shape[0]
    for wi, wh, b in zip(kernels_i, kernels_h, biases):
        if wi.shape != (In, H) or wh.shape != (H, H) or (b is not None and b.shape != (H,)):
            raise FormatError(f"{what}: {prefix!r}: kernels must be (In, H) and (H, H), biases "
                              f"(H,); got {wi.shape}, {wh.shape}, "
                              f"{None if b is None else b.shape}")
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise FormatError(f"{what}: {prefix!r}: some hidden denses have a bias, some not")
    b = None if biases[0] is None else np.concatenate(biases)
    return {"name": prefix, "w_ih": np.ascontiguousarray(np.concatenate(kernels_i, axis=1).T),
            "w_hh": np.ascontiguousarray(np.concatenate(kernels_h, axis=1).T), "b": b,
            "w_hr": None, "peep": None,
            "label": {"w_ih": "ii/if/ig/io kernels", "w_hh": "hi/hf/hg/ho kernels"}}


def _flax_nnx_opt_cell(flat, prefix, what):
    wi = _get(flat, _join(prefix, "dense_i/kernel"), what, 2)
    wh = _get(flat, _join(prefix, "dense_h/kernel"), what, 2)
    H = wh.shape[0]
    if wh.shape != (H, 4 * H) or wi.shape[1] != 4 * H:
        raise FormatError(f"{what}: {prefix!r}: dense_i/kernel {wi.shape} and dense_h/kernel "
                          f"{wh.shape} are not (In, 4H) and (H, 4H)")
    b = None
    for name in ("dense_h/bias", "dense_i/bias"):
        key = _join(prefix, name)
        if key in flat:
            bb = _get(flat, key, what, 1)
            if bb.shape != (4 * H,):
                raise FormatError(f"{what}: {key!r} has shape {bb.shape}, expected ({4 * H},)")
            b = bb.astype(np.float64) if b is None else b + bb
    # Gate blocks i, f, g, o: PyTorch's order already.
    return {"name": prefix, "w_ih": np.ascontiguousarray(wi.T), "w_hh": np.ascontiguousarray(wh.T),
            "b": b, "w_hr": None, "peep": None,
            "label": {"w_ih": "dense_i/kernel", "w_hh": "dense_h/kernel"}}


def _flax_opts(gate_fn, activation_fn):
    return _act_opts(_activation(gate_fn, "gate_fn"), _activation(activation_fn, "activation_fn"))


def from_flax_lstm_cell(params, *, gate_fn="sigmoid", activation_fn="tanh", prefix=None,
                        batch_first=False, dtype=None, num_threads=None):
    """A fastlstm.LSTM from Flax ``LSTMCell`` parameters (linen, and NNX whose
    forget-gate dense is ``if_``); linen's ``OptimizedLSTMCell`` has the same
    parameters.  Eight denses used as x·W: ``ii``, ``if``, ``ig``, ``io``
    (kernel (In, H), no bias) and ``hi``, ``hf``, ``hg``, ``ho`` (kernel (H, H)
    and bias (H,)):  i = σ(x·W_ii + h·W_hi + b_hi), likewise f, o;
    g = tanh(x·W_ig + h·W_hg + b_hg); c' = f·c + i·g; h' = o·tanh(c').
    The tree may be the cell's own dict or hold it (``{"params": {"cell":
    ...}}``: use ``prefix`` when it holds several cells).  Flax NNX's
    ``OptimizedLSTMCell`` (``dense_i``, ``dense_h``) is found here too.
    ``gate_fn`` / ``activation_fn``: the cell's functions (names or the
    functions themselves, e.g. ``jax.nn.sigmoid``).

    State: Flax's carry is (c, h); fastlstm takes ``hx=(h, c)``.
    """
    flat = flatten_tree(params)
    plain = _flax_candidates(flat)
    opt = _prefixes(flat, "dense_i/kernel")
    layout = _layout(prefix, plain + [p for p in opt if p not in plain], "Flax LSTMCell")
    cells = []
    for layer in layout:
        row = []
        for p in layer:
            if _join(p, "ii/kernel") in flat:
                row.append(_flax_cell(flat, p, "Flax LSTMCell"))
            elif _join(p, "dense_i/kernel") in flat:
                row.append(_flax_nnx_opt_cell(flat, p, "Flax OptimizedLSTMCell"))
            else:
                raise FormatError(f"Flax LSTMCell: no {_join(p, 'ii/kernel')!r} or "
                                  f"{_join(p, 'dense_i/kernel')!r} in the parameter tree")
        cells.append(row)
    return _build(cells, _flax_opts(gate_fn, activation_fn), batch_first=batch_first,
                  dtype=dtype, num_threads=num_threads, what="Flax LSTMCell")


def from_flax_optimized_lstm_cell(params, **kwargs):
    """Flax ``OptimizedLSTMCell``: linen's has LSTMCell's parameters
    (``ii`` ... ``ho``); NNX's has ``dense_i`` (kernel (In, 4H), no bias) and
    ``dense_h`` (kernel (H, 4H), bias (4H)) with gate blocks i, f, g, o.
    Both are read by :func:`from_flax_lstm_cell`; this is an alias.
    State: (c, h)."""
    return from_flax_lstm_cell(params, **kwargs)


# -------------------------------------------------------------------- Haiku
def _haiku_candidates(flat):
    out = []
    for p in _prefixes(flat, "w"):
        if _join(p, "b") not in flat:
            continue
        w = flat[_join(p, "w")]
        shape = getattr(w, "shape", ())
        if len(shape) != 2 or not shape[1] or shape[1] % 4 or shape[0] < shape[1] // 4:
            continue
        out.append(p)
    lstm = [p for p in out if "lstm" in p.lower()]
    return lstm or out


def _haiku_cell(flat, prefix, what):
    if _join(prefix, "w") not in flat and _join(prefix, "linear/w") in flat:
        prefix = _join(prefix, "linear")
    w = _get(flat, _join(prefix, "w"), what, 2)
    b = _get(flat, _join(prefix, "b"), what, 1)
    if w.shape[1] % 4 or not w.shape[1]:
        raise FormatError(f"{what}: {_join(prefix, 'w')!r} has shape {w.shape}, expected "
                          "(In+H, 4H)")
    H = w.shape[1] // 4
    In = w.shape[0] - H
    if In < 0 or b.shape != (4 * H,):
        raise FormatError(f"{what}: w {w.shape} and b {b.shape} are not (In+H, 4H) and (4H,)")
    # Haiku's blocks: i, g, f, o, and f = σ(f + 1) at run time.
    W = _blocks(w, "igfo", axis=1)
    bb = _blocks(b.astype(np.float64), "igfo", axis=0)
    bb[H:2 * H] += 1.0
    return {"name": prefix, "w_ih": np.ascontiguousarray(W[:In].T),
            "w_hh": np.ascontiguousarray(W[In:].T), "b": bb, "w_hr": None, "peep": None,
            "label": {"w_ih": "w rows [:In]", "w_hh": "w rows [In:]"}}


def from_haiku_lstm(params, *, prefix=None, batch_first=False, dtype=None, num_threads=None):
    """A fastlstm.LSTM from ``hk.LSTM`` parameters: ``{"lstm/linear": {"w":
    (In + H, 4H), "b": (4H,)}}`` applied to [x, h], gate blocks i, g, f, o,
    and Haiku adds 1 to the forget gate at run time (f = σ(f + 1)), which is
    folded into the bias here.  With several LSTMs in the tree (e.g.
    ``hk.DeepRNN``: ``lstm/linear``, ``lstm_1/linear``) pass ``prefix``, or a
    list of them for a stacked LSTM.

    State: Haiku's ``LSTMState(hidden, cell)`` is (h, c), the order fastlstm
    takes in ``hx``.
    """
    flat = flatten_tree(params)
    layout = _layout(prefix, _haiku_candidates(flat), "Haiku LSTM")
    cells = [[_haiku_cell(flat, p, "Haiku LSTM") for p in layer] for layer in layout]
    return _build(cells, {}, batch_first=batch_first, dtype=dtype, num_threads=num_threads,
                  what="Haiku LSTM")


# ------------------------------------------------------------------ Equinox
def _eqx_cell(cell, name, what):
    """An ``equinox.nn.LSTMCell`` (or a mapping with its fields) -> a cell
    dict.  Equinox: lin = weight_ih @ x + weight_hh @ h (+ bias), split in
    blocks i, f, g, o: PyTorch's layout, with one bias."""
    if isinstance(cell, Mapping):
        get = cell.get
    else:
        def get(key):
            return getattr(cell, key, None)
    w_ih, w_hh = get("weight_ih"), get("weight_hh")
    if w_ih is None or w_hh is None:
        raise FormatError(f"{what}: {name}: expected an equinox.nn.LSTMCell (weight_ih, "
                          f"weight_hh, bias), got {type(cell).__name__}")
    w_ih = _to_numpy(w_ih, f"{name}.weight_ih")
    w_hh = _to_numpy(w_hh, f"{name}.weight_hh")
    if w_hh.ndim != 2 or w_hh.shape[0] != 4 * w_hh.shape[1] or not w_hh.size:
        raise FormatError(f"{what}: {name}.weight_hh has shape {w_hh.shape}, expected (4H, H)")
    H = w_hh.shape[1]
    if w_ih.ndim != 2 or w_ih.shape[0] != 4 * H:
        raise FormatError(f"{what}: {name}.weight_ih has shape {w_ih.shape}, expected "
                          f"({4 * H}, In)")
    b = get("bias")
    if get("use_bias") is False:
        b = None
    if b is not None:
        b = _to_numpy(b, f"{name}.bias")
        if b.shape != (4 * H,):
            raise FormatError(f"{what}: {name}.bias has shape {b.shape}, expected ({4 * H},)")
    return {"name": name, "w_ih": np.ascontiguousarray(w_ih),
            "w_hh": np.ascontiguousarray(w_hh), "b": b, "w_hr": None, "peep": None,
            "label": {"w_ih": f"{name}.weight_ih", "w_hh": f"{name}.weight_hh"}}


def from_equinox_lstm_cell(cells, *, batch_first=False, dtype=None, num_threads=None):
    """A fastlstm.LSTM from ``equinox.nn.LSTMCell`` modules (weights copied).

    cells: one cell; a list of cells for a stacked LSTM (layer k reads layer
    k-1's outputs); or a list of (forward, backward) pairs for a
    bidirectional one (the backward cell scanned over the reversed sequence,
    its outputs returned in time order after the forward ones).  A mapping
    with the fields ``weight_ih`` (4H, In), ``weight_hh`` (4H, H) and
    ``bias`` (4H,) or None also counts as a cell (e.g. after
    ``eqx.tree_deserialise_leaves`` into your own model, pass its cell).
    Equinox's cell runs one step of one sequence (``cell(x, (h, c))``, used
    under ``jax.lax.scan`` and ``jax.vmap``); fastlstm runs the whole batch
    and sequence in one call.

    State: Equinox's hidden state is (h, c), the order fastlstm takes in
    ``hx`` (each (num_layers * num_directions, N, H)).
    """
    what = "Equinox LSTMCell"
    layout = _per_layer(cells, "cells", lambda c: not isinstance(c, (list, tuple)), "a cell",
                        ValueError)
    built = [[_eqx_cell(c, n, what) for c, n in layer] for layer in layout]
    if any(c["b"] is not None for layer in built for c in layer):
        for layer in built:  # use_bias=False beside cells with bias: a zero bias (exact)
            for c in layer:
                if c["b"] is None:
                    c["b"] = np.zeros(c["w_hh"].shape[0], c["w_hh"].dtype)
    return _build(built, {}, batch_first=batch_first, dtype=dtype, num_threads=num_threads,
                  what=what)
