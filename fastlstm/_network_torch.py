"""PyTorch loaders of fastlstm.Network (live modules and state dicts)."""
from __future__ import annotations

import os

import numpy as np

from .errors import FormatError, WeightsError
from .model import LSTM, _to_numpy

_ACT_MODULES = {"Softmax": "softmax", "LogSoftmax": "log_softmax", "Sigmoid": "sigmoid"}


def _find(module, names, kind, wanted, required):
    """Pick the submodule(s) of a type: by name, or the only one."""
    if wanted is False:
        return None
    if wanted is not None:
        picked = []
        for name in ([wanted] if isinstance(wanted, str) else list(wanted)):
            try:
                picked.append((name, module.get_submodule(name)))
            except AttributeError as exc:
                raise WeightsError(f"{kind}: no submodule {name!r} in "
                                   f"{type(module).__name__}") from exc
        return picked if not isinstance(wanted, str) else picked[0]
    found = names.get(kind, [])
    if not found:
        if required:
            raise WeightsError(f"module: no {kind} found in {type(module).__name__}")
        return None
    if len(found) > 1:
        arg = {"Embedding": "embedding", "LSTM": "lstm", "Linear": "head"}[kind]
        raise WeightsError(f"module: {len(found)} {kind} submodules "
                           f"({[n for n, _ in found]}); pass {arg}= with the one to use")
    return found[0]


def network_from_torch(cls, module, *, embedding, lstm, head, activation, one_hot, mode,
                       batch_first, dtype, num_threads):
    import torch.nn as nn
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, nn.LSTM):
        lstm_mods = [("", module)]
        emb_mod = head_mod = None
        acts = []
    else:
        names = {}
        acts = []
        for name, sub in module.named_modules():
            if sub is module:
                continue
            for kind, typ in (("Embedding", nn.Embedding), ("LSTM", nn.LSTM),
                              ("Linear", nn.Linear)):
                if type(sub) is typ or (isinstance(sub, typ) and kind != "Linear"):
                    names.setdefault(kind, []).append((name, sub))
            if type(sub).__name__ in _ACT_MODULES:
                acts.append((name, _ACT_MODULES[type(sub).__name__]))
        got = _find(module, names, "LSTM", lstm, True)
        lstm_mods = got if isinstance(got, list) else [got]
        emb_mod = _find(module, names, "Embedding", embedding, False) if one_hot is None else None
        head_mod = _find(module, names, "Linear", head, False)
    for name, m in lstm_mods:
        if not isinstance(m, nn.LSTM):
            raise TypeError(f"lstm: {name!r} is a {type(m).__name__}, not an nn.LSTM")
    lstms = [LSTM.from_torch(m, dtype=dtype, num_threads=num_threads) for _, m in lstm_mods]
    lstms = _same_dtype(lstms)
    emb = None
    if emb_mod is not None:
        name, m = emb_mod
        if not isinstance(m, nn.Embedding):
            raise TypeError(f"embedding: {name!r} is a {type(m).__name__}, not an nn.Embedding")
        if m.max_norm is not None:
            raise WeightsError(f"embedding {name!r}: max_norm renormalises rows at lookup; "
                               "fastlstm does not (renormalise the weights and set max_norm=None)")
        emb = m.weight.detach()
    w = b = None
    if head_mod is not None:
        name, m = head_mod
        if not isinstance(m, nn.Linear):
            raise TypeError(f"head: {name!r} is a {type(m).__name__}, not an nn.Linear")
        w = m.weight.detach()
        b = None if m.bias is None else m.bias.detach()
    if activation is None:
        kinds = sorted({k for _, k in acts})
        if len(kinds) > 1:
            raise WeightsError(f"module: several activation modules {acts}; pass activation=")
        activation = kinds[0] if kinds else "none"
    if batch_first is None:
        batch_first = bool(lstm_mods[0][1].batch_first)
    return cls(lstms if len(lstms) > 1 else lstms[0], embedding=emb, one_hot=one_hot, head=w,
               head_bias=b, activation=activation, mode=mode, batch_first=batch_first,
               num_threads=num_threads)


def _same_dtype(lstms):
    """A chain must share one dtype: float64 only if every LSTM is."""
    if len({m.dtype for m in lstms}) > 1:
        lstms = [LSTM.from_state_dict(m.state_dict(), batch_first=m.batch_first,
                                      dtype=np.float32, num_threads=m.num_threads)
                 for m in lstms]
    return lstms


def _flatten_candidates(obj, depth=0):
    """Dicts inside a loaded checkpoint that could be state dicts."""
    if depth > 8:
        return
    if isinstance(obj, dict):
        if any(isinstance(k, str) and k.endswith("weight_ih_l0") for k in obj):
            yield obj
        for v in obj.values():
            yield from _flatten_candidates(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _flatten_candidates(v, depth + 1)


def _lstm_prefixes(sd):
    return sorted(k[:-len("weight_ih_l0")].rstrip(".") for k in sd
                  if isinstance(k, str) and k.endswith("weight_ih_l0")
                  and not k.endswith("_reverse"))


def network_from_state_dict(cls, state_dict, *, lstm, embedding, head, activation, one_hot,
                            mode, batch_first, dtype, num_threads):
    sd = state_dict
    if isinstance(sd, (str, os.PathLike)):
        from .io import TorchFile
        from .io.stacks import flatten
        with TorchFile(sd) as f:
            sd = f.materialize()
            if f.torchscript:  # its module tree as nested dicts -> a state dict's dotted keys
                sd = flatten(sd, lambda v: isinstance(v, np.ndarray))
    if hasattr(sd, "state_dict") and callable(sd.state_dict):  # an nn.Module by mistake
        sd = sd.state_dict()
    if not isinstance(sd, dict) or not any(isinstance(k, str) and k.endswith("weight_ih_l0")
                                           for k in sd):
        cands = list(_flatten_candidates(sd))
        if len(cands) != 1:
            raise FormatError("state_dict: no unique state dict with LSTM weights found "
                              f"({len(cands)} candidates)")
        sd = cands[0]
    prefixes = _lstm_prefixes(sd)
    if lstm is None:
        if len(prefixes) != 1:
            raise WeightsError(f"state_dict: {len(prefixes)} LSTMs ({prefixes}); pass lstm= "
                               "with the name (or a list of names) to use")
        lstm = prefixes[0]
    names = [lstm] if isinstance(lstm, str) else list(lstm)

    def pre(name):
        return f"{name}." if name else ""

    lstms = []
    for name in names:
        if name not in prefixes:
            raise WeightsError(f"lstm: no LSTM named {name!r} in the state dict; found "
                               f"{prefixes}")
        p = pre(name)
        sub = {k: v for k, v in sd.items() if isinstance(k, str) and k.startswith(p)
               and k[len(p):].split("_l")[0] in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                  "weight_hr")}
        lstms.append(LSTM.from_state_dict(sub, prefix=p, dtype=dtype, num_threads=num_threads))
    lstms = _same_dtype(lstms)

    def get(key, required=True):
        if key not in sd:
            if required:
                raise WeightsError(f"state_dict: missing key {key!r}")
            return None
        return _to_numpy(sd[key], f"state_dict[{key!r}]")

    emb = get(f"{pre(embedding)}weight") if embedding else None
    w = get(f"{pre(head)}weight") if head else None
    b = get(f"{pre(head)}bias", required=False) if head else None
    return cls(lstms if len(lstms) > 1 else lstms[0], embedding=emb, one_hot=one_hot, head=w,
               head_bias=b, activation=activation, mode=mode, batch_first=batch_first,
               num_threads=num_threads)
