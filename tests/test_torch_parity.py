"""fastlstm against torch.nn.LSTM itself (weights loaded with from_torch)."""
import numpy as np
import pytest

import fastlstm
from tolerances import assert_close

torch = pytest.importorskip("torch", reason="torch is the oracle for PyTorch semantics")


def _torch_run(mod, x, hx):
    with torch.no_grad():
        xt = torch.from_numpy(x)
        if hx is None:
            out, (h, c) = mod(xt)
        else:
            out, (h, c) = mod(xt, tuple(torch.from_numpy(a) for a in hx))
    return out.numpy(), h.numpy(), c.numpy()


@pytest.mark.parametrize("seed", range(24))
def test_random_configs_match_torch(seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    big = seed % 4 == 0
    T = int(rng.integers(1, 301 if big else 25))
    N = int(rng.integers(1, 18))
    In = int(rng.integers(1, 301 if big else 50))
    H = int(rng.integers(2, 301 if big else 50))
    L = int(rng.integers(1, 4))
    bi = bool(rng.integers(0, 2))
    P = int(rng.integers(1, H)) if rng.integers(0, 3) == 0 else 0
    bias = bool(rng.integers(0, 4) != 0)
    bf = bool(rng.integers(0, 2))
    dtype = np.float64 if seed % 6 == 5 else np.float32
    unbatched = seed % 7 == 3
    mod = torch.nn.LSTM(In, H, num_layers=L, bias=bias, batch_first=bf, bidirectional=bi,
                        proj_size=P, dropout=0.0)
    if dtype == np.float64:
        mod = mod.double()
    mod.eval()
    m = fastlstm.LSTM.from_torch(mod)
    assert m.dtype == np.dtype(dtype)
    D = 2 if bi else 1
    shape = (T, In) if unbatched else ((N, T, In) if bf else (T, N, In))
    x = rng.standard_normal(shape).astype(dtype)
    hx = None
    if rng.integers(0, 2):
        b = () if unbatched else (N,)
        hx = (rng.standard_normal((L * D,) + b + (P or H,)).astype(dtype),
              rng.standard_normal((L * D,) + b + (H,)).astype(dtype))
    want = _torch_run(mod, x, hx)
    out, (h, c) = m(x, hx, num_threads=int(rng.integers(1, 3)))
    tol_dtype = np.float32 if dtype == np.float32 else np.float64
    what = f"T={T} N={N} In={In} H={H} L={L} bi={bi} P={P} bias={bias} bf={bf}"
    assert out.shape == want[0].shape and h.shape == want[1].shape and c.shape == want[2].shape
    if dtype == np.float64:
        # torch's float64 LSTM sums in a different order: compare at the
        # float64 bound against our reference, and with torch at 1e-10.
        assert np.abs(out - want[0]).max() < 1e-10
        ref = m.reference(x, hx)
        assert_close(out, ref[0], tol_dtype, what)
        return
    assert_close(out, want[0], tol_dtype, what + " out")
    assert_close(h, want[1], tol_dtype, what + " h_n")
    assert_close(c, want[2], tol_dtype, what + " c_n")


def test_state_dict_roundtrip_with_torch():
    mod = torch.nn.LSTM(5, 12, num_layers=2, bidirectional=True, proj_size=4)
    m = fastlstm.LSTM.from_state_dict(mod.state_dict())
    assert (m.num_layers, m.bidirectional, m.proj_size, m.hidden_size, m.input_size) == (2, True, 4, 12, 5)
    sd = m.state_dict()
    mod2 = torch.nn.LSTM(5, 12, num_layers=2, bidirectional=True, proj_size=4)
    mod2.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    for k, v in mod.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), mod2.state_dict()[k].numpy())


def test_prefixed_state_dict():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 6)
            self.lstm = torch.nn.LSTM(6, 8, batch_first=True)

    net = Net()
    m = fastlstm.LSTM.from_state_dict(net.state_dict(), prefix="lstm.", batch_first=True)
    x = np.random.default_rng(0).standard_normal((2, 5, 6)).astype(np.float32)
    want = _torch_run(net.lstm, x, None)
    assert_close(m(x)[0], want[0], np.float32)


def test_dropout_is_ignored_at_inference():
    mod = torch.nn.LSTM(4, 6, num_layers=2, dropout=0.5).eval()
    m = fastlstm.LSTM.from_torch(mod)
    assert m.dropout == 0.5
    x = np.random.default_rng(1).standard_normal((5, 2, 4)).astype(np.float32)
    assert_close(m(x)[0], _torch_run(mod, x, None)[0], np.float32)
