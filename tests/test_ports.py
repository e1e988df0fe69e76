"""tests/ports.py: the ports the distributed tests' masters bind."""
import importlib.util
import socket
from pathlib import Path


def _fresh_copy(monkeypatch, worker):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    spec = importlib.util.spec_from_file_location(f"ports_{worker}", Path(__file__).with_name("ports.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ports_lie_below_the_ephemeral_range_in_a_block_per_xdist_worker(monkeypatch):
    gw0 = _fresh_copy(monkeypatch, "gw0")
    a = [gw0.free_port() for _ in range(20)]
    block0 = gw0._block()
    gw1 = _fresh_copy(monkeypatch, "gw1")
    b = [gw1.free_port() for _ in range(20)]
    low = gw0._ephemeral_low()
    assert len(set(a)) == 20 and len(set(b)) == 20 and not set(a) & set(b)
    assert all(10000 <= p < min(low, 32768) for p in a + b)
    # a port in use is passed over
    nxt = block0[(a[-1] - block0[0] + 1) % len(block0)]
    with socket.socket() as held:
        held.bind(("127.0.0.1", nxt))
        held.listen()
        assert gw0.free_port() != nxt
