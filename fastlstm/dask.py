"""Batch scoring on Dask: millions of sequences, one model, many cores or nodes.

    import dask.array as da, dask.bag as db
    from dask.distributed import Client
    import fastlstm, fastlstm.dask as fd

    client = Client()                       # or Client("tcp://scheduler:8786")
    model = fastlstm.load("encoder.safetensors")
    x = da.from_zarr(...)                   # (N, T, input_size), chunked along N
    h = fd.score_array(model, x)            # dask array (N, D*H_out): each h_n
    h.compute()  # or h.to_zarr(...)

    bag = db.from_sequence(sequences, npartitions=64)   # items: (T_i, input_size)
    fd.score_bag(model, bag).compute()      # one result per sequence, in order

Needs Dask (``pip install "dask[distributed]"``); importing ``fastlstm`` does
not import this module or Dask.  Everything here is Dask glue around
``LSTM.__call__``: each task runs plain NumPy batches through the model, so a
distributed result is bitwise identical to the single-process one (the engine
is deterministic and each row's result is independent of its batch).

The model goes to each worker once, not once per task:

* With a ``dask.distributed`` client (``client=`` or the default client, e.g.
  the one ``Client(...)`` just made), the model is sent with
  ``client.scatter(..., broadcast=True)``: one copy to every worker, kept in
  the worker's memory and deserialized there once; every task receives that
  same object (a dependency on the scattered key, no bytes in the task).
  The key is ``fastlstm-model-<sha1 of the model's pickle>-<random>``: every
  call of ``score_array``/``score_bag`` scatters again (about the weights'
  size per worker, once per call) under a key of its own.
* Without one (the local threaded or synchronous scheduler, or
  ``client=False``), the model is a single ``dask.delayed`` node of the
  graph (``pure=True``, named after its contents) that every task depends
  on.  Local schedulers pass the object itself to the tasks; a distributed
  scheduler computes it on one worker, and each other worker fetches it once
  and shares it between all the tasks it runs.  (Local *process* schedulers,
  e.g. ``dask.bag``'s default, pickle task arguments per task: use the
  threaded scheduler or a distributed client.)

Either way only the configuration and the canonical weights travel (an
``LSTM`` pickles to about the size of its weights); each worker rebuilds the
packed kernel layout once, when it unpickles.  One model object is then
shared by the worker's threads: calls do not mutate it, and weight updates
swap the packed weights under the model's lock.

Threads: a Dask worker runs ``nthreads`` tasks at once and each task's
fastlstm call can use several threads of its own.  The default
``num_threads`` for the calls is ``cores // (threads of all Dask workers on
that host)`` (at least 1; the minimum over hosts), so Dask threads times
fastlstm threads never exceed the cores: with ``LocalCluster(n_workers=2,
threads_per_worker=1)`` on 8 cores each call uses 4 threads; with one
worker of 8 threads, 1.  Cores are counted by ``os.sched_getaffinity`` on
each worker (the CPUs it may run on, which respects taskset and cgroup
cpusets).  Without a distributed client the threaded scheduler runs
``dask.config.get("num_workers")`` (default: the CPU count) tasks at once,
so calls get ``cores // that`` threads.  Pass ``num_threads=`` to choose.

Memory allocator: ``distributed``'s nanny starts worker processes with
``MALLOC_TRIM_THRESHOLD_=65536`` (its ``distributed.nanny.pre-spawn-environ``
default).  Setting it turns off glibc's adaptive mmap threshold, so every
model call's output and workspace (a few MB) are mapped fresh from the OS
and page-faulted in: measured here, scoring in such a worker ran at half the
speed of the same code in a plain process.  ``worker_config()`` gives Dask
settings that keep buffers below 32 MiB in the heap (``MALLOC_MMAP_THRESHOLD_``)
and trim it only beyond 128 MiB free: set them before the cluster starts
(``with dask.config.set(fastlstm.dask.worker_config()): LocalCluster(...)``),
or on a real cluster in the workers' Dask configuration (see docs/scaling.md).

One layout that scales well: one worker process per node or per socket with
``threads_per_worker=1`` and fastlstm using the cores, or one single-threaded
worker per core (each call single-threaded) -- both keep every core busy; the
benchmark ``benchmarks/bench_dask.py`` compares them against a plain loop.
"""
from __future__ import annotations

import hashlib
import uuid
import os
import pickle

import numpy as np

try:
    import dask
    import dask.array as da
except ImportError as exc:  # pragma: no cover - exercised only without dask
    raise ImportError(
        "fastlstm.dask needs Dask, which is not installed: "
        'pip install "dask[distributed]"') from exc

from .model import LSTM, _valid_ends

__all__ = ["score_array", "score_bag", "score_batch", "score_sequences", "model_argument",
           "default_num_threads", "worker_config", "WORKER_ENV", "OUTPUTS"]

OUTPUTS = ("h_n", "last", "sequence")
_BATCH_BYTES = 1 << 22  # default batch: ~4 MiB of workspace, output and input per call

#: Environment for Dask worker processes: glibc keeps freed buffers below
#: 32 MiB in the heap and returns heap memory to the OS only beyond 128 MiB
#: free, instead of an mmap + page faults per model call (module docstring).
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "134217728"}


def worker_config():
    """Dask settings that give nanny-started workers ``WORKER_ENV``.

    ``with dask.config.set(fastlstm.dask.worker_config()):`` around the
    creation of a ``LocalCluster`` (the nanny reads them when it spawns a
    worker).  For ``dask worker`` processes put the same keys in a YAML file
    of their Dask configuration (e.g. ``~/.config/dask/fastlstm.yaml``:
    ``distributed: nanny: pre-spawn-environ: MALLOC_MMAP_THRESHOLD_: 33554432``
    and ``MALLOC_TRIM_THRESHOLD_: 134217728``); not ``DASK_...`` environment
    variables, which Dask lower-cases (glibc ignores lower-case names).
    """
    return {"distributed.nanny.pre-spawn-environ." + k: v for k, v in WORKER_ENV.items()}


# ----------------------------------------------------------------- helpers
def _check_model(model):
    if not isinstance(model, LSTM):
        raise TypeError(f"model: expected a fastlstm.LSTM, got {type(model).__name__}")


def _check_output(output):
    if output not in OUTPUTS:
        raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")


def _check_common(output, padding, batch_size):
    _check_output(output)
    if padding not in ("zeros", "repeat"):
        raise ValueError(f"padding: expected 'zeros' or 'repeat', got {padding!r}")
    if batch_size is not None and (isinstance(batch_size, bool)
                                   or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ValueError(f"batch_size: expected a positive int or None, got {batch_size!r}")


def _features(model):
    return model.num_directions * model.output_size


def _get_client(client):
    """The distributed client to use: `client`, else the default one, else None."""
    if client is False:
        return None
    if client is not None:
        return client
    try:
        from distributed import default_client
    except ImportError:
        return None
    try:
        return default_client()
    except ValueError:
        return None


def _model_token(model):
    """A content hash of the model (configuration and weights)."""
    return hashlib.sha1(pickle.dumps(model, protocol=5)).hexdigest()


def model_argument(model, client=None, *, _token=None):
    """What the tasks take as their model: a broadcast Future or a Delayed.

    With a distributed client (``client``, or the default client; ``False``
    for none) the model is scattered to every worker once
    (``broadcast=True``) under the key ``fastlstm-model-<sha1 of its
    pickle>-<random suffix>``; otherwise it becomes one ``dask.delayed`` node of that name.
    ``score_array`` and ``score_bag`` call this; use it to build your own
    tasks on the same per-worker copy (``dask.array.blockwise``,
    ``Bag.map_partitions``, ``client.submit`` take it as an argument).
    """
    _check_model(model)
    key = "fastlstm-model-" + (_token or _model_token(model))
    cl = _get_client(client)
    if cl is not None:
        # A fresh suffix per call: reusing one key while the scheduler is still
        # forgetting the previous call's copy of it cancels the new
        # computation ("lost dependencies").
        key = f"{key}-{uuid.uuid4().hex[:12]}"
        return cl.scatter({key: model}, broadcast=True)[key]
    return dask.delayed(model, pure=True, traverse=False, name=key)


def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_num_threads(client=None):
    """fastlstm threads per call so that Dask threads x fastlstm threads <= cores.

    With a distributed client: for every host, its usable cores divided by
    the sum of ``nthreads`` of the Dask workers on it; the minimum over hosts,
    at least 1.  Without one: usable cores // ``dask.config.get("num_workers")``
    (the threaded scheduler's pool size, default the CPU count).
    """
    cl = _get_client(client)
    if cl is None:
        pool = dask.config.get("num_workers", None) or os.cpu_count() or 1
        return max(1, _usable_cores() // int(pool))
    workers = cl.scheduler_info(n_workers=-1)["workers"]
    if not workers:
        return 1
    cores = cl.run(_usable_cores)  # {address: cores}
    hosts = {}
    for addr, info in workers.items():
        threads, ncores = hosts.get(info.get("host", addr), (0, 1))
        hosts[info.get("host", addr)] = (threads + int(info["nthreads"]),
                                         max(ncores, int(cores.get(addr, 1))))
    return max(1, min(c // max(1, t) for t, c in hosts.values()))


def _resolve(model, client, num_threads):
    """(model argument for the tasks, fastlstm threads per call, content token)."""
    _check_model(model)
    if num_threads is None:
        num_threads = default_num_threads(client)
    elif isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) \
            or num_threads < 1:
        raise ValueError(f"num_threads: expected a positive int or None, got {num_threads!r}")
    token = _model_token(model)
    return model_argument(model, client, _token=token), int(num_threads), token


def _auto_batch(model, T):
    """Rows per call: the engine's workspace plus the output and input rows
    near _BATCH_BYTES, within 32..1024 (at least 32 rows, so that each step's
    read of the weights is shared by enough rows to stay compute-bound)."""
    T = max(int(T), 1)
    per_row = (model._stack.workspace_bytes(T, 256) / 256
               + T * (_features(model) + model.input_size) * model.dtype.itemsize)
    return int(min(1024, max(32, _BATCH_BYTES // max(per_row, 1))))


# ------------------------------------------------------------ the one task
def score_batch(model, x, lengths=None, *, mask=None, output="h_n", padding="zeros",
                num_threads=None):
    """Score one padded batch ``x`` (N, T, input_size), batch first whatever
    ``model.batch_first`` says, in one model call.  ``lengths`` (N,) or
    ``mask`` (N, T) booleans (batch first too), as in ``LSTM.__call__``.

    output: ``"h_n"`` the last layer's final hidden state (N, D*H_out),
    ``[forward | reverse]`` (for a sequence of length 0, the zero initial
    state); ``"last"`` the output at each sequence's last valid step
    (N, D*H_out) (zeros for length 0; for the reverse direction this is its
    output after one step, which is why ``"h_n"`` is the default);
    ``"sequence"`` the whole output (N, T, D*H_out), zeros (or, with
    ``padding="repeat"``, the Keras fill) past each sequence's end and at
    masked steps.
    """
    _check_output(output)
    x = np.asarray(x)
    N, T = x.shape[0], x.shape[1]
    kw = {"num_threads": num_threads}
    if lengths is not None or mask is not None:
        kw.update(lengths=lengths, padding=padding)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (N, T):
            raise ValueError(f"mask: expected shape ({N}, {T}) (batch first, as x), "
                             f"got {mask.shape}")
        kw["mask"] = mask if model.batch_first else mask.T
        lengths = _valid_ends(mask)  # "last": the output at each row's last valid step
    if model.batch_first:
        out, (h_n, _) = model(x, **kw)
    else:
        out, (h_n, _) = model(x.transpose(1, 0, 2), **kw)
        out = out.transpose(1, 0, 2)
    if output == "sequence":
        return np.ascontiguousarray(out)
    if output == "h_n":
        D = model.num_directions
        return np.ascontiguousarray(h_n[-D:].transpose(1, 0, 2).reshape(N, -1))
    if T == 0:
        return np.zeros((N, out.shape[2]), out.dtype)
    if lengths is None:
        return np.ascontiguousarray(out[:, T - 1])
    lens = np.asarray(lengths, np.int64)
    res = out[np.arange(N), np.maximum(lens - 1, 0)]
    res[lens == 0] = 0
    return res


def _score_block(x, lengths, model, output, padding, batch_size, num_threads, mask=None):
    """A Dask block (n, T, input_size) -> its result, in batches of rows."""
    n, T = x.shape[0], x.shape[1]
    bs = batch_size or _auto_batch(model, T)
    F = _features(model)
    shape = (n, T, F) if output == "sequence" else (n, F)
    res = np.empty(shape, model.dtype)
    for i in range(0, n, bs):
        lb = None if lengths is None else lengths[i:i + bs]
        mb = None if mask is None else mask[i:i + bs]
        res[i:i + bs] = score_batch(model, x[i:i + bs], lb, mask=mb, output=output,
                                    padding=padding, num_threads=num_threads)
    return res


def _score_block_lengths(x, lengths, model, output, padding, batch_size, num_threads):
    return _score_block(x, lengths, model, output, padding, batch_size, num_threads)


def _score_block_mask(x, mask, model, output, padding, batch_size, num_threads):
    return _score_block(x, None, model, output, padding, batch_size, num_threads, mask)


def _score_block_plain(x, model, output, padding, batch_size, num_threads):
    return _score_block(x, None, model, output, padding, batch_size, num_threads)


# -------------------------------------------------------------- dask array
def score_array(model, x, *, lengths=None, mask=None, output="h_n", padding="zeros",
                batch_size=None, num_threads=None, client=None):
    """Score a Dask array ``x`` of shape (N, T, input_size) -> a Dask array.

    ``x`` is read batch first (N, T, input_size) whatever ``model.batch_first``
    says, and is chunked along N only (other axes are rechunked to one chunk).
    ``lengths``: None, or N ints (NumPy or Dask array, rechunked like ``x``)
    of valid steps per sequence, as in ``LSTM.__call__``; or ``mask``: None,
    or (N, T) booleans (NumPy or Dask array, batch first), True at valid
    steps (``LSTM.__call__``'s ``mask``: Keras masks, holes included).

    Returns, chunked like ``x`` along N, with the model's dtype:
    ``output="h_n"`` (default) (N, D*H_out), the last layer's final hidden
    state ``[forward | reverse]``; ``"last"`` (N, D*H_out), the output at
    each sequence's last valid step; ``"sequence"`` (N, T, D*H_out), every
    step (see ``score_batch``).

    Each block is run in batches of ``batch_size`` rows (default: as many as
    keep the call's workspace, output and input near 4 MiB, 32..1024 rows),
    each one call with ``num_threads`` threads (default
    ``default_num_threads(client)``).
    The model reaches each worker once (see the module docstring); ``client``:
    a ``distributed.Client``, None for the default client if any, False to
    put the model in the graph as a delayed value instead of scattering it.
    Nothing is computed until you call ``.compute()`` (or store the result).
    """
    _check_model(model)
    _check_common(output, padding, batch_size)
    if not isinstance(x, da.Array):
        raise TypeError(f"x: expected a dask.array.Array, got {type(x).__name__} "
                        "(use dask.array.from_array, or call the model directly)")
    if x.ndim != 3 or x.shape[2] != model.input_size:
        raise ValueError(f"x: expected shape (N, T, {model.input_size}), got {x.shape}")
    x = x.rechunk({1: -1, 2: -1})
    marg, nt, token = _resolve(model, client, num_threads)
    F, dt = _features(model), model.dtype
    out_ind = "ntf" if output == "sequence" else "nf"
    meta = np.empty((0,) * len(out_ind), dt)
    common = dict(new_axes={"f": F}, concatenate=True, dtype=dt, meta=meta,
                  name="fastlstm-score-" + dask.base.tokenize(
                      x, lengths, mask, token, output, padding, batch_size, nt))
    extra = (marg, None, output, None, padding, None, batch_size, None, nt, None)
    if mask is not None:
        if lengths is not None:
            raise ValueError("lengths, mask: give one of them, not both")
        want = (x.shape[0], x.shape[1])
        if mask.shape != want:
            raise ValueError(f"mask: expected shape {want} (batch first, as x), got {mask.shape}")
        if not isinstance(mask, da.Array):
            mask = da.from_array(np.asarray(mask), chunks=(x.chunks[0], -1))
        else:
            mask = mask.rechunk((x.chunks[0], -1))
        return da.blockwise(_score_block_mask, out_ind, x, "nti", mask, "nt", *extra, **common)
    if lengths is None:
        return da.blockwise(_score_block_plain, out_ind, x, "nti", *extra, **common)
    if not isinstance(lengths, da.Array):
        lengths = np.asarray(lengths)
        if lengths.shape != (x.shape[0],):
            raise ValueError(f"lengths: expected shape ({x.shape[0]},), got {lengths.shape}")
        lengths = da.from_array(lengths, chunks=(x.chunks[0],))
    elif lengths.shape != (x.shape[0],):
        raise ValueError(f"lengths: expected shape ({x.shape[0]},), got {lengths.shape}")
    else:
        lengths = lengths.rechunk((x.chunks[0],))
    return da.blockwise(_score_block_lengths, out_ind, x, "nti", lengths, "n", *extra,
                        **common)


# ---------------------------------------------------------------- dask bag
def score_sequences(model, seqs, *, output="h_n", padding="zeros", batch_size=None,
                    num_threads=None):
    """Score a list of variable-length sequences, each (T_i, input_size),
    in padded batches; returns one result per sequence, in order.

    Sequences are sorted by length so each batch pads to little more than
    its own longest member, then run with ``lengths=`` (no work past each
    end).  Results: ``"h_n"``/``"last"`` arrays (D*H_out,), ``"sequence"``
    arrays (T_i, D*H_out).  This is what each ``score_bag`` task runs on its
    partition; it needs no Dask.
    """
    _check_model(model)
    _check_common(output, padding, batch_size)
    In, dt = model.input_size, model.dtype
    arrs = []
    for k, s in enumerate(seqs):
        a = np.asarray(s)
        if a.ndim != 2 or a.shape[1] != In:
            raise ValueError(f"sequence {k}: expected shape (T_i, {In}), got {a.shape}")
        arrs.append(a)
    if not arrs:
        return []
    lens = np.array([a.shape[0] for a in arrs], np.int64)
    order = np.argsort(-lens, kind="stable")
    results = [None] * len(arrs)
    i = 0
    while i < len(order):
        T = int(lens[order[i]])
        bs = batch_size or _auto_batch(model, T)
        idx = order[i:i + bs]
        xb = np.zeros((len(idx), T, In), dt)
        for r, k in enumerate(idx):
            xb[r, :lens[k]] = arrs[k]
        res = score_batch(model, xb, lens[idx], output=output, padding=padding,
                          num_threads=num_threads)
        for r, k in enumerate(idx):
            results[k] = res[r, :lens[k]] if output == "sequence" else res[r]
        i += len(idx)
    return results


def _score_partition(part, model, output, padding, batch_size, num_threads, keyed):
    part = list(part)
    if keyed:
        keys = [kv[0] for kv in part]
        res = score_sequences(model, [kv[1] for kv in part], output=output, padding=padding,
                              batch_size=batch_size, num_threads=num_threads)
        return list(zip(keys, res))
    return score_sequences(model, part, output=output, padding=padding, batch_size=batch_size,
                           num_threads=num_threads)


def score_bag(model, bag, *, output="h_n", padding="zeros", batch_size=None, num_threads=None,
              keyed=False, client=None):
    """Score a Dask bag of variable-length sequences -> a bag of results.

    Items are arrays (T_i, input_size) (or, with ``keyed=True``, pairs
    ``(key, array)``, giving ``(key, result)``).  Each partition is grouped
    into padded batches of similar lengths and run with ``lengths=`` (see
    ``score_sequences``); the result bag has the same partitions and order.
    Results per item: ``output="h_n"`` (default) or ``"last"`` an array
    (D*H_out,), ``"sequence"`` an array (T_i, D*H_out).  ``batch_size``,
    ``num_threads``, ``client``: as in ``score_array``.

    For a Dask DataFrame, turn it into a bag of ``(key, array)`` pairs first
    (``df.to_bag(index=True)`` yields each row as a tuple; build the
    (T_i, input_size) array from the row's columns) and pass ``keyed=True``.
    """
    import dask.bag as db

    _check_model(model)
    _check_common(output, padding, batch_size)
    if not isinstance(bag, db.Bag):
        raise TypeError(f"bag: expected a dask.bag.Bag, got {type(bag).__name__}")
    marg, nt, _ = _resolve(model, client, num_threads)
    return bag.map_partitions(_score_partition, marg, output, padding, batch_size, nt,
                              bool(keyed))
