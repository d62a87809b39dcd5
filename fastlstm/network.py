"""fastlstm.Network: whole prediction networks around fastlstm.LSTM.

    input stage         LSTM stack(s)          head
    embedding table  ->  fastlstm.LSTM  ->  linear, then softmax /
    or one-hot           (a chain of          log_softmax / sigmoid / none
    or features          them, usually one)

Modes: ``"sequence"`` (sequence labelling: one output per step),
``"last"`` (sequence classification: the output after the last step, or the
last valid step with ``lengths=``) and ``"prediction"`` (a next-token
predictor: per-step outputs over the vocabulary, ``generate()`` and
``stream()``).

``generate()`` runs the whole autoregressive loop in C (csrc/generate.c):
prompt, then per token: embedding lookup, LSTM step, head, sampling and
feedback, with the GIL released.  Sampling draws from Philox4x32-10, a
counter-based generator keyed by (seed, stream) and indexed by the step, so
a row's tokens depend only on its own prompt, seed and stream: see
``Network.generate``.
"""
from __future__ import annotations

import numpy as np

from . import _engine
from .errors import DTypeError, ShapeError, WeightsError
from .model import LSTM, _as_real, _positive_int, _to_numpy

__all__ = ["Network", "NetworkStream", "ACTIVATIONS", "MODES"]

ACTIVATIONS = ("none", "softmax", "log_softmax", "sigmoid")
_ACT_ALIASES = {None: "none", "none": "none", "linear": "none", "identity": "none",
                "softmax": "softmax", "log_softmax": "log_softmax",
                "logsoftmax": "log_softmax", "sigmoid": "sigmoid"}
MODES = ("sequence", "last", "prediction")
_MODE_ALIASES = {"sequence": "sequence", "labelling": "sequence", "labeling": "sequence",
                 "tagging": "sequence", "last": "last", "classification": "last",
                 "prediction": "prediction", "lm": "prediction"}
_INT_MAX = 2 ** 31 - 1
_U64 = 2 ** 64


def _activation_name(name):
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in _ACT_ALIASES:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")
    return _ACT_ALIASES[key]


def _apply_activation(z, act):
    if act == "none":
        return z
    if act == "sigmoid":
        with np.errstate(over="ignore"):
            return (1.0 / (1.0 + np.exp(-z))).astype(z.dtype, copy=False)
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0).astype(z.dtype)
    e = np.exp(z - m)
    s = np.sum(e, axis=-1, keepdims=True)
    if act == "softmax":
        return e / s
    return z - m - np.log(s)


class Network:
    """An LSTM network with an optional input stage and an optional dense head.

    ``Network(lstm, *, embedding=None, one_hot=None, head=None, head_bias=None,
    activation="none", mode="sequence", batch_first=True, mask_zero=False,
    mask_value=None, num_threads=None)``

    lstm: a ``fastlstm.LSTM``, or a list of them run one after the other (a
      chain, e.g. Keras layers of different widths).
    embedding: an (vocab, input_size) table: the input is token ids.
    one_hot: a vocabulary size equal to the first LSTM's input_size: the input
      is token ids, each fed as a one-hot vector.  (Neither: the input is
      feature vectors.)
    head: (out_features, features) weights of a linear layer in torch.nn.Linear's
      layout (features = the last LSTM's num_directions * output_size) and
      head_bias (out_features,); None: the network outputs the LSTM features.
    activation: applied after the head: "none", "softmax", "log_softmax" or
      "sigmoid" (over the last axis).
    mode: "sequence" (an output per step), "last" (the output after each
      sequence's last valid step: the final h of the last layer; for a
      bidirectional stack [h_n forward, h_n reverse], as Keras'
      Bidirectional and torch's ``cat((h_n[-2], h_n[-1]))``) or "prediction"
      (per-step outputs of a next-token model: needs a token input stage and a
      head over at most the input vocabulary, and allows ``generate``).
    batch_first: layout of the input and of the per-step output, (N, T, ...)
      (default) or (T, N, ...).  ``generate`` always takes (N, T) prompts.
    mask_zero: token 0 is padding (Keras ``Embedding(mask_zero=True)``):
      without ``lengths=`` each row's length is taken as one past its last
      nonzero token, and outputs past a row's end repeat the last valid one
      as in Keras; a 0 inside a row is a masked step there, skipped as Keras
      skips it (the state carries over it; LSTM's ``mask=``).  Prompts to
      ``generate`` take trailing padding only.
    mask_value: feature input only: a step whose features all equal it is
      masked (Keras ``Masking(mask_value)``), with mask_zero's semantics
      (without ``lengths=``: skipped, outputs as in Keras); None: no masking.
      Streams (``stream``) apply both masks per step and row.

    Weights are converted to the LSTM's dtype (float32 or float64) and copied.
    """

    def __init__(self, lstm, *, embedding=None, one_hot=None, head=None, head_bias=None,
                 activation="none", mode="sequence", batch_first=True, mask_zero=False,
                 mask_value=None, num_threads=None):
        lstms = list(lstm) if isinstance(lstm, (list, tuple)) else [lstm]
        if not lstms or not all(isinstance(m, LSTM) for m in lstms):
            raise TypeError("lstm: expected a fastlstm.LSTM or a non-empty list of them")
        dt = lstms[0].dtype
        for k, (a, b) in enumerate(zip(lstms, lstms[1:])):
            if b.dtype != dt:
                raise DTypeError(f"lstm[{k + 1}]: dtype {b.dtype} differs from lstm[0]'s {dt}")
            if b.input_size != a.num_directions * a.output_size:
                raise ShapeError(f"lstm[{k + 1}]: input_size {b.input_size} does not match "
                                 f"lstm[{k}]'s output ({a.num_directions * a.output_size})")
        self.lstms = lstms
        self.dtype = dt
        self.num_threads = num_threads
        self.batch_first = bool(batch_first)
        self.mask_zero = bool(mask_zero)
        if embedding is not None and one_hot is not None:
            raise ValueError("embedding, one_hot: give one input stage, not both")
        self.embedding = None
        self.one_hot = None
        if embedding is not None:
            emb = _as_real(embedding, "embedding", dt)
            if emb.ndim != 2 or emb.shape[0] < 1:
                raise WeightsError(f"embedding: expected a (vocab, {lstms[0].input_size}) table, "
                                   f"got shape {emb.shape}")
            if emb.shape[1] != lstms[0].input_size:
                raise WeightsError(f"embedding: dimension {emb.shape[1]} does not match the "
                                   f"LSTM's input_size {lstms[0].input_size}")
            if emb.shape[0] > _INT_MAX:
                raise WeightsError("embedding: too many rows")
            self.embedding = np.array(emb, dtype=dt, order="C", copy=True)
        elif one_hot is not None:
            v = _positive_int(one_hot, "one_hot", 1)
            if v != lstms[0].input_size:
                raise ShapeError(f"one_hot: vocabulary {v} must equal the LSTM's input_size "
                                 f"{lstms[0].input_size}")
            self.one_hot = v
        if self.mask_zero and self.vocab_size is None:
            raise ValueError("mask_zero: needs a token input stage (embedding or one_hot)")
        self.mask_value = None
        if mask_value is not None:
            if self.vocab_size is not None:
                raise ValueError("mask_value: masks feature input; with token input use "
                                 "mask_zero")
            mv = _to_numpy(mask_value, "mask_value")
            if mv.ndim != 0 or mv.dtype.kind not in "iuf":
                raise DTypeError(f"mask_value: expected a real number, got {mask_value!r}")
            self.mask_value = float(mv)
        feat = self.lstms[-1].num_directions * self.lstms[-1].output_size
        self.head_weight = self.head_bias = None
        if head is not None:
            w = _as_real(head, "head", dt)
            if w.ndim != 2 or w.shape[1] != feat or w.shape[0] < 1:
                raise WeightsError(f"head: expected (out_features, {feat}) weights (torch.nn.Linear "
                                   f"layout), got shape {w.shape}")
            self.head_weight = np.array(w, dtype=dt, order="C", copy=True)
            if head_bias is not None:
                b = _as_real(head_bias, "head_bias", dt)
                if b.shape != (w.shape[0],):
                    raise WeightsError(f"head_bias: expected shape ({w.shape[0]},), got {b.shape}")
                self.head_bias = np.array(b, dtype=dt, order="C", copy=True)
        elif head_bias is not None:
            raise ValueError("head_bias: given without head")
        self.activation = _activation_name(activation)
        if mode not in _MODE_ALIASES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode = _MODE_ALIASES[mode]
        if self.mode == "prediction":
            why = self._why_not_generative()
            if why:
                raise ValueError(f"mode='prediction': {why}")
        for a in (self.embedding, self.head_weight, self.head_bias):
            if a is not None:  # the packed head is a copy: keep the source unchanged
                a.setflags(write=False)
        self._head = None  # packed head for generation, made on first use

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_head"] = None  # packed C object: rebuilt on first use
        return state

    def __setstate__(self, state):
        # Rebuilt through the constructor: its checks (table and head shapes
        # against the LSTMs) are what keep generate()'s C loop in bounds.
        try:
            self.__init__(state["lstms"], embedding=state.get("embedding"),
                          one_hot=state.get("one_hot"), head=state.get("head_weight"),
                          head_bias=state.get("head_bias"),
                          activation=state.get("activation", "none"),
                          mode=state.get("mode", "sequence"),
                          batch_first=state.get("batch_first", True),
                          mask_zero=state.get("mask_zero", False),
                          mask_value=state.get("mask_value"),
                          num_threads=state.get("num_threads"))
        except (KeyError, TypeError, ValueError, WeightsError, ShapeError, DTypeError) as exc:
            raise WeightsError(f"pickle: not a valid fastlstm.Network ({exc})") from exc

    # ------------------------------------------------------------ properties
    @property
    def _keras_masks(self):
        """Whether the network masks its input as Keras does (mask_zero or
        mask_value): outputs at masked steps as Keras, not zeros."""
        return self.mask_zero or self.mask_value is not None

    def _keras_mask(self, tok, feats):
        """The mask Keras would compute, of tok's shape (a call's (N, T), a
        stream step's (batch,)): mask_zero's nonzero tokens, or mask_value's
        steps with a feature other than it; None without either."""
        if self.mask_zero:
            return tok != 0
        if self.mask_value is not None:
            return np.any(feats != feats.dtype.type(self.mask_value), axis=-1)
        return None

    @property
    def lstm(self):
        """The LSTM, when the network has a single one."""
        if len(self.lstms) != 1:
            raise AttributeError(f"this network chains {len(self.lstms)} LSTMs; use .lstms")
        return self.lstms[0]

    @property
    def vocab_size(self):
        """Input vocabulary (embedding rows or one-hot size), None for feature input."""
        if self.embedding is not None:
            return self.embedding.shape[0]
        return self.one_hot

    @property
    def input_kind(self):
        return "embedding" if self.embedding is not None else (
            "one_hot" if self.one_hot is not None else "features")

    @property
    def features(self):
        """Features the last LSTM gives (num_directions * output_size)."""
        return self.lstms[-1].num_directions * self.lstms[-1].output_size

    @property
    def output_size(self):
        """Size of the network's output per step (the head's out_features)."""
        return self.head_weight.shape[0] if self.head_weight is not None else self.features

    def __repr__(self):
        parts = []
        if self.embedding is not None:
            parts.append(f"embedding={self.embedding.shape}")
        elif self.one_hot is not None:
            parts.append(f"one_hot={self.one_hot}")
        parts.append(" -> ".join(repr(m) for m in self.lstms))
        if self.head_weight is not None:
            parts.append(f"head=({self.features} -> {self.output_size})")
        if self.activation != "none":
            parts.append(f"activation={self.activation!r}")
        parts.append(f"mode={self.mode!r}")
        return f"fastlstm.Network({', '.join(parts)})"

    def _why_not_generative(self):
        if self.vocab_size is None:
            return "generation needs a token input stage (embedding or one_hot)"
        if self.head_weight is None:
            return "generation needs a head over the vocabulary"
        if self.output_size > self.vocab_size:
            return (f"the head has {self.output_size} outputs but the input vocabulary only "
                    f"{self.vocab_size} tokens")
        if any(m.bidirectional for m in self.lstms):
            return "a bidirectional LSTM cannot generate (its reverse direction needs the future)"
        return None

    # ----------------------------------------------------------------- input
    def _tokens(self, x, lengths, name="x"):
        """Token ids -> int64 (N, T) batch-major, unbatched flag, lengths (or None)."""
        arr = _to_numpy(x, name)
        if arr.dtype.kind not in "iu":
            raise DTypeError(f"{name}: expected integer token ids, got dtype {arr.dtype}")
        if arr.ndim not in (1, 2):
            raise ShapeError(f"{name}: expected token ids of shape (T,) or "
                             f"{'(N, T)' if self.batch_first else '(T, N)'}, got {arr.shape}")
        unbatched = arr.ndim == 1
        tok = arr[None] if unbatched else (arr if self.batch_first else arr.T)
        return tok, unbatched

    def _check_tokens(self, tok, lens, name):
        """Range check over the valid positions; returns tokens with padding set to 0."""
        V = self.vocab_size
        N, T = tok.shape
        if lens is not None:
            valid = np.arange(T)[None, :] < lens[:, None]
            if tok.size and (np.any((tok < 0) & valid) or np.any((tok >= V) & valid)):
                raise ValueError(f"{name}: token ids must be in [0, {V}) (vocabulary size)")
            return np.where(valid, tok, 0)
        if tok.size and (tok.min() < 0 or tok.max() >= V):
            raise ValueError(f"{name}: token ids must be in [0, {V}) (vocabulary size), got "
                             f"min {tok.min()} and max {tok.max()}")
        return tok

    def _lookup(self, tok):
        """(N, T) valid ids -> (N, T, input_size) in the model's dtype."""
        if self.embedding is not None:
            return self.embedding[tok]
        x = np.zeros(tok.shape + (self.one_hot,), self.dtype)
        np.put_along_axis(x, tok[..., None].astype(np.intp), 1, axis=-1)
        return x

    def _prompt_lengths(self, lengths, N, T, unbatched, tok):
        """A prompt's lengths: as given, or with mask_zero one past each
        row's last nonzero token (a 0 before it is refused: generation
        continues from each prompt's end); None for full rows."""
        from .model import _check_lengths, _valid_ends
        if lengths is not None:
            return _check_lengths(lengths, N, T, unbatched)
        if not self.mask_zero:
            return None
        nz = tok != 0
        last = _valid_ends(nz)
        if np.any(~nz & (np.arange(T)[None, :] < last[:, None])):
            raise ValueError("prompt: token 0 (mask_zero padding) inside a prompt; "
                             "generation continues from each prompt's end, so only "
                             "trailing padding is taken (pass lengths= explicitly)")
        return last

    # ------------------------------------------------------------------ call
    def __call__(self, x, lengths=None, *, mask=None, state=None, return_state=False,
                 num_threads=None):
        """Run the network.

        x: token ids (N, T) (unbatched (T,)) for an embedding or one-hot input
        stage, else features (N, T, input_size) (unbatched (T, input_size));
        time-major with batch_first=False.
        lengths: None or N ints in [0, T]: valid steps per sequence (PyTorch
        PackedSequence semantics); tokens past a sequence's end are ignored.
        mask: None or booleans of x's (N, T) ((T, N) with batch_first=False,
        (T,) unbatched), True at valid steps, any pattern (LSTM's ``mask=``);
        it replaces what mask_zero / mask_value would infer.  Give lengths or
        mask, not both.
        state: None (zeros) or the initial state, one ``(h_0, c_0)`` in
        torch.nn.LSTM's shapes per LSTM of the chain (a single pair for one LSTM).
        Returns, in the model's dtype:
          mode "sequence"/"prediction": (N, T, output_size) ((T, N, ...) with
          batch_first=False); positions past a sequence's end are zeros (with
          mask_zero, as Keras, there and at 0 tokens inside a row: the head on
          the last valid output repeated, or on zeros when the last LSTM is
          bidirectional); so are masked steps (the same Keras rule with
          mask_zero or mask_value);
          mode "last": (N, output_size);
        unbatched input drops N.  With return_state=True: ``(out, state)``,
        state as taken by ``state=`` (h_n, c_n after each row's last valid step).
        """
        from .model import _check_lengths, _check_mask
        nt = num_threads if num_threads is not None else self.num_threads
        tok = None
        if self.vocab_size is not None:
            tok, unbatched = self._tokens(x, lengths)
            N, T = tok.shape
            lens = None if lengths is None else _check_lengths(lengths, N, T, unbatched)
            tok = self._check_tokens(tok, lens, "x")
            feats = self._lookup(tok)
        else:
            arr = _as_real(x, "x", self.dtype)
            if arr.ndim not in (2, 3):
                raise ShapeError(f"x: expected features of shape (T, {self.lstms[0].input_size}) "
                                 f"or {'(N, T' if self.batch_first else '(T, N'}, "
                                 f"{self.lstms[0].input_size}), got {arr.shape}")
            unbatched = arr.ndim == 2
            feats = arr[None] if unbatched else (arr if self.batch_first else arr.transpose(1, 0, 2))
            N, T = feats.shape[:2]
            lens = None if lengths is None else _check_lengths(lengths, N, T, unbatched)
        if mask is not None:
            if lengths is not None:
                raise ValueError("lengths, mask: give one of them, not both")
            lead = (T,) if unbatched else ((N, T) if self.batch_first else (T, N))
            mask = _check_mask(mask, lead, unbatched, self.batch_first).T  # (N, T)
        elif lengths is None:
            # Keras' own masks (the LSTM turns one whose valid steps are
            # prefixes into lengths: no padding step is computed)
            mask = self._keras_mask(tok, feats)
        states = self._split_state(state, N, unbatched)
        y = feats  # (N, T, F) batch-major views throughout
        new_states = []
        for m, hx in zip(self.lstms, states):
            # Keras: a masked LSTM repeats its last output past the mask; one in
            # Bidirectional outputs zeros there (zero_output_for_mask)
            padding = "repeat" if self._keras_masks and m.num_directions == 1 else "zeros"
            xin = y if m.batch_first else y.transpose(1, 0, 2)
            mk = None if mask is None else (mask if m.batch_first else mask.T)
            out, (hn, cn) = m(xin, hx, lengths=lens, mask=mk, padding=padding, num_threads=nt)
            y = out if m.batch_first else out.transpose(1, 0, 2)
            new_states.append((hn, cn))
        if self.mode == "last":
            last = self.lstms[-1]
            hn = new_states[-1][0]
            z = hn[-1] if last.num_directions == 1 else np.concatenate([hn[-2], hn[-1]], axis=-1)
            out = self._apply_head(z)
        else:
            out = self._apply_head(y)
            if not self._keras_masks:  # zeros, after head and activation
                if lens is not None:
                    out[np.arange(T)[None, :] >= lens[:, None]] = 0
                elif mask is not None:
                    out[~mask] = 0
            if not self.batch_first:
                out = out.transpose(1, 0, 2)
        if unbatched:
            out = out[0] if (self.mode == "last" or self.batch_first) else out[:, 0]
        if not return_state:
            return out
        if unbatched:
            new_states = [(h[:, 0], c[:, 0]) for h, c in new_states]
        return out, (new_states[0] if len(new_states) == 1 else new_states)

    forward = __call__

    def _apply_head(self, z):
        if self.head_weight is not None:
            z = np.matmul(z, self.head_weight.T)
            if self.head_bias is not None:
                z += self.head_bias
        else:
            z = np.array(z, copy=True)
        return _apply_activation(z, self.activation)

    def _split_state(self, state, N, unbatched):
        if state is None:
            return [None] * len(self.lstms)
        if len(self.lstms) == 1 and isinstance(state, (tuple, list)) and len(state) == 2 \
                and not isinstance(state[0], (tuple, list)):
            state = [state]
        if not isinstance(state, (tuple, list)) or len(state) != len(self.lstms):
            raise ShapeError(f"state: expected one (h, c) pair per LSTM ({len(self.lstms)})")
        out = []
        for k, (m, hc) in enumerate(zip(self.lstms, state)):
            if hc is None:
                out.append(None)
                continue
            if not isinstance(hc, (tuple, list)) or len(hc) != 2:
                raise ShapeError(f"state[{k}]: expected a pair (h, c)")
            h, c = (_as_real(v, f"state[{k}]", self.dtype) for v in hc)
            if unbatched and h.ndim == 2 and c.ndim == 2:
                h, c = h[:, None], c[:, None]
            out.append((h, c))
        return out

    # ------------------------------------------------------------ generation
    def _packed_head(self):
        if self._head is None:
            code = 0 if self.dtype == np.float32 else 1
            self._head = _engine.Head(code, self.head_weight, self.head_bias)
        return self._head

    def generate(self, prompt, steps, temperature=1.0, top_k=None, seed=None, *, lengths=None,
                 state=None, return_state=False, num_threads=None):
        """Autoregressive generation, the whole loop in C with the GIL released.

        prompt: token ids (T,) or (N, T) (always batch-major), or a list of N
          sequences of different lengths (padded, lengths inferred).  The
          prompt is consumed in one call, then each step runs the head on the
          top layer's h, samples a token, looks it up and runs one LSTM step.
          T may be 0 (start from ``state``, or zeros).
        steps: tokens to generate per row.
        temperature: 0 for greedy decoding (argmax, lowest index on ties as
          torch.argmax), else sample from softmax(logits / temperature); the
          head's activation is not applied (softmax and log_softmax give the
          same distribution; with sigmoid or none the head outputs are taken
          as logits).
        top_k: None (all tokens) or k >= 1: sample among the k largest logits.
        seed: None (fresh OS entropy), an int in [0, 2**64): row n draws from
          Philox stream (seed, n); or a sequence of N ints: row n draws from
          stream (seed[n], 0).  So ``generate(prompts, seed=s)`` row n equals
          ``generate(prompts[n], seed=[s])`` only for n = 0 -- pass per-row
          seeds to make rows independent of their position.
        lengths: N ints in [0, T]: row n's prompt is prompt[n, :lengths[n]]
          (an empty prompt starts from the state as it is).
        state: initial state, as for ``__call__`` (shapes (layers, N, ...)).
        Returns int64 tokens (N, steps) ((steps,) for a 1-D prompt); with
        return_state=True also the state after the prompt and every generated
        token but the last (continue with ``generate(tokens[:, -1:], ...,
        state=state)``).
        """
        why = self._why_not_generative()
        if why:
            raise ValueError(f"generate: {why}")
        steps = _positive_int(steps, "steps", 0)
        if steps > _INT_MAX:
            raise ValueError(f"steps: expected at most {_INT_MAX}, got {steps}")
        try:
            temperature = float(temperature)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"temperature: expected a number, got {temperature!r}") from exc
        if not (temperature >= 0.0) or np.isinf(temperature):
            raise ValueError(f"temperature: expected a finite value >= 0, got {temperature}")
        if top_k is None:
            k = 0
        else:
            k = min(_positive_int(top_k, "top_k", 1), _INT_MAX)
        tok, unbatched, lens = self._prompt(prompt, lengths)
        N, T = tok.shape
        if T >= _INT_MAX or N >= _INT_MAX:
            raise ShapeError(f"prompt: too large, shape {tok.shape}")
        seeds, streams = self._seeds(seed, N)
        dt = self.dtype
        hs, cs = [], []
        states = self._split_state(state, N, unbatched)
        for i, (m, hc) in enumerate(zip(self.lstms, states)):
            hshape = (m.num_layers, N, m.output_size)
            cshape = (m.num_layers, N, m.hidden_size)
            if hc is None:
                hs.append(np.zeros(hshape, dt))
                cs.append(np.zeros(cshape, dt))
                continue
            h = np.array(_as_real(hc[0], f"state[{i}][0] (h)", dt), dtype=dt, order="C")
            c = np.array(_as_real(hc[1], f"state[{i}][1] (c)", dt), dtype=dt, order="C")
            if unbatched and h.ndim == 2:
                h, c = h[:, None].copy(), c[:, None].copy()
            if h.shape != hshape or c.shape != cshape:
                raise ShapeError(f"state[{i}]: expected shapes {hshape} and {cshape}, got "
                                 f"{h.shape} and {c.shape}")
            hs.append(h)
            cs.append(c)
        order = None
        if lens is not None:
            order = np.argsort(-lens, kind="stable")
            if np.array_equal(order, np.arange(N)):
                order = None
            else:
                tok, lens = tok[order], lens[order]
                seeds, streams = seeds[order], streams[order]
                hs = [np.ascontiguousarray(h[:, order]) for h in hs]
                cs = [np.ascontiguousarray(c[:, order]) for c in cs]
            lens = np.ascontiguousarray(lens, np.int32)
        prompt32 = np.ascontiguousarray(tok, np.int32)
        out = np.empty((N, steps), np.int32)
        stacks = [m._stack for m in self.lstms]
        head = self._packed_head()
        emb = self.embedding
        in_features = self.lstms[0].input_size
        ws = np.empty(_engine.generate_workspace_bytes(
            stacks, head, emb, self.vocab_size, in_features, T, N), np.uint8)
        nt = num_threads if num_threads is not None else self.num_threads
        nt = 0 if nt is None else min(_positive_int(nt, "num_threads", 1), _INT_MAX)
        _engine.generate(stacks, hs, cs, head, emb, self.vocab_size, in_features, prompt32,
                         lens, steps, out, temperature, k, seeds, streams, ws, nt)
        if order is not None:
            inv = np.argsort(order)
            out = out[inv]
            hs = [h[:, inv] for h in hs]
            cs = [c[:, inv] for c in cs]
        tokens = out.astype(np.int64)
        if unbatched:
            tokens = tokens[0]
        if not return_state:
            return tokens
        st = [(h[:, 0], c[:, 0]) if unbatched else (h, c) for h, c in zip(hs, cs)]
        return tokens, (st[0] if len(st) == 1 else st)

    def _prompt(self, prompt, lengths):
        """-> (N, T) int64 ids with padding zeroed, unbatched flag, int32 lengths or None."""
        ragged = (isinstance(prompt, (list, tuple)) and len(prompt) > 0
                  and all(isinstance(p, (list, tuple, np.ndarray)) or hasattr(p, "detach")
                          for p in prompt))
        if ragged:
            rows = [_to_numpy(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
            for i, r in enumerate(rows):
                if r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
                    raise ShapeError(f"prompt[{i}]: expected a 1-D sequence of token ids")
            T = max(r.size for r in rows)
            tok = np.zeros((len(rows), T), np.int64)
            for i, r in enumerate(rows):
                tok[i, :r.size] = r
            if lengths is None:
                lengths = [r.size for r in rows]
            unbatched = False
        else:
            arr = _to_numpy(prompt, "prompt")
            if arr.ndim == 1 and arr.size == 0:
                arr = arr.astype(np.int64)
            if arr.dtype.kind not in "iu":
                raise DTypeError(f"prompt: expected integer token ids, got dtype {arr.dtype}")
            if arr.ndim not in (1, 2):
                raise ShapeError(f"prompt: expected shape (T,) or (N, T), got {arr.shape}")
            unbatched = arr.ndim == 1
            tok = arr[None] if unbatched else arr
        N, T = tok.shape
        lens = self._prompt_lengths(lengths, N, T, unbatched, tok)
        tok = self._check_tokens(tok.astype(np.int64, copy=False), lens, "prompt")
        if lens is not None and np.all(lens == T):
            lens = None
        return tok, unbatched, lens

    @staticmethod
    def _seeds(seed, N):
        if seed is None:
            s = int(np.random.SeedSequence().entropy) % _U64
            return np.full(N, s, np.uint64), np.arange(N, dtype=np.uint64)
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            s = int(seed)
            if not 0 <= s < _U64:
                raise ValueError(f"seed: expected an int in [0, 2**64), got {seed}")
            return np.full(N, s, np.uint64), np.arange(N, dtype=np.uint64)
        try:
            vals = [int(v) for v in seed]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"seed: expected None, an int or a sequence of {N} ints, "
                            f"got {seed!r}") from exc
        if len(vals) != N:
            raise ValueError(f"seed: expected {N} seeds (one per prompt), got {len(vals)}")
        if any(not 0 <= v < _U64 for v in vals):
            raise ValueError("seed: every seed must be in [0, 2**64)")
        return np.array(vals, np.uint64), np.zeros(N, np.uint64)

    def stream(self, batch=1, *, num_threads=None):
        """A stateful step-by-step runner (e.g. the prediction network of a
        transducer): ``s = net.stream(batch)``; ``y = s.step(tokens)``."""
        return NetworkStream(self, batch, num_threads=num_threads)

    # --------------------------------------------------------------- loaders
    @classmethod
    def from_torch(cls, module, *, embedding=None, lstm=None, head=None, activation=None,
                   one_hot=None, mode="sequence", batch_first=None, dtype=None,
                   num_threads=None):
        """Build a network from a live PyTorch module made of nn.Embedding,
        nn.LSTM and nn.Linear (weights are copied).

        The submodules are found by type: at most one nn.Embedding (the input
        stage), one nn.LSTM and one nn.Linear (the head); pass their names
        (``embedding="emb"``, ``lstm="rnn"`` or a list of names for a chain,
        ``head="fc"``; ``False`` for none) when there are several.  A module
        that is itself an nn.LSTM gives a network without input stage or head.
        activation: None infers it from a single nn.Softmax / nn.LogSoftmax /
        nn.Sigmoid submodule (functional calls in forward() cannot be seen:
        pass it then), else "none".  one_hot: vocabulary size for a one-hot
        input stage.  batch_first: None takes the nn.LSTM's.
        """
        from ._network_torch import network_from_torch
        return network_from_torch(cls, module, embedding=embedding, lstm=lstm, head=head,
                                  activation=activation, one_hot=one_hot, mode=mode,
                                  batch_first=batch_first, dtype=dtype, num_threads=num_threads)

    @classmethod
    def from_state_dict(cls, state_dict, *, lstm=None, embedding=None, head=None,
                        activation="none", one_hot=None, mode="sequence", batch_first=True,
                        dtype=None, num_threads=None):
        """Build a network from a PyTorch state dict (tensors or arrays), or
        from a ``torch.save`` file of one or a TorchScript archive of the
        model (read by fastlstm's restricted unpickler: torch is not needed).

        lstm: the nn.LSTM's name (key prefix without the dot; a list of
        names for a chain; None: the only LSTM in the dict); embedding: the
        nn.Embedding's name (``<name>.weight``); head: the nn.Linear's name
        (``<name>.weight``, ``<name>.bias``).  Checkpoints that nest the state
        dict (``{"model_state_dict": ...}``) are searched.
        """
        from ._network_torch import network_from_state_dict
        return network_from_state_dict(cls, state_dict, lstm=lstm, embedding=embedding,
                                       head=head, activation=activation, one_hot=one_hot,
                                       mode=mode, batch_first=batch_first, dtype=dtype,
                                       num_threads=num_threads)

    @classmethod
    def from_keras(cls, source, *, config=None, mode=None, dtype=np.float32, num_threads=None):
        """Build a network from a Keras Sequential model of Embedding, LSTM /
        Bidirectional(LSTM) layers and a Dense (or TimeDistributed(Dense))
        head, optionally followed by an Activation / Softmax layer: a
        ``.keras`` archive, a full-model ``.h5`` file, a weights-only file
        with ``config=``, or a live model.  Only the JSON config and the HDF5
        datasets are read (nothing in the file is executed); the LSTM layers
        are loaded by ``fastlstm.io.keras.load_keras``.  mode: None takes
        "sequence" if the last LSTM returns sequences, else "last"."""
        from ._network_keras import network_from_keras
        return network_from_keras(cls, source, config=config, mode=mode, dtype=dtype,
                                  num_threads=num_threads)


class NetworkStream:
    """Step-by-step runner of a unidirectional network: ``step(tokens)``
    (or features) feeds one step of ``batch`` rows and returns the head's
    output (batch, output_size); state kept between calls.  ``reset()``,
    ``state`` (a list of (h, c) per LSTM)."""

    def __init__(self, net, batch=1, num_threads=None):
        if any(m.bidirectional for m in net.lstms):
            raise ValueError("stream: a bidirectional LSTM needs the whole sequence")
        self.net = net
        self.batch = _positive_int(batch, "batch", 1)
        self._streams = [m.stream(self.batch, num_threads=num_threads) for m in net.lstms]

    def reset(self, rows=None):
        for s in self._streams:
            s.reset(rows)

    @property
    def state(self):
        return [s.state for s in self._streams]

    @state.setter
    def state(self, value):
        if len(value) != len(self._streams):
            raise ShapeError(f"state: expected {len(self._streams)} (h, c) pairs")
        for s, hc in zip(self._streams, value):
            s.state = hc

    def step(self, x_t):
        """tokens (batch,) (a scalar for batch 1) or features (batch, input_size)."""
        net = self.net
        if net.vocab_size is not None:
            arr = _to_numpy(x_t, "x_t")
            if arr.dtype.kind not in "iu":
                raise DTypeError(f"x_t: expected integer token ids, got dtype {arr.dtype}")
            scalar = arr.ndim == 0
            tok = arr.reshape(-1)
            if tok.shape != (self.batch,):
                raise ShapeError(f"x_t: expected {self.batch} token ids, got shape {arr.shape}")
            tok = net._check_tokens(tok[None].astype(np.int64), None, "x_t")
            x = net._lookup(tok)[0]
            valid = net._keras_mask(tok[0], None)
        else:
            x = _as_real(x_t, "x_t", net.dtype)
            scalar = x.ndim == 1
            if scalar:
                x = x[None]
            valid = net._keras_mask(None, x)
        if valid is not None and valid.all():
            valid = None
        # a masked row (mask_zero's token 0, mask_value's features) keeps its
        # state and repeats its last output, as Keras' masked step
        for s in self._streams:
            x = s.step(x) if valid is None else s.step(x, mask=valid, padding="repeat")
        y = net._apply_head(x)
        return y[0] if scalar and self.batch == 1 else y

