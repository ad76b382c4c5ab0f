"""Per-process device settings (pipeline.device)."""

import torch

from pipeline.device import setup_cpu


def test_setup_cpu_flushes_subnormals(monkeypatch):
    """Subnormal floats make x86 arithmetic 10-100x slower late in training; every stage flushes them."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # leave the test run's threads alone
    try:
        torch.set_flush_denormal(False)  # earlier tests may have run a stage's setup_cpu in this process
        tiny = torch.tensor([1e-39, 1.0])  # 1e-39 is below float32's smallest normal (1.18e-38)
        assert (tiny * 1.5)[0] != 0
        setup_cpu()
        assert (tiny * 1.5)[0] == 0 and (tiny * 1.5)[1] == 1.5
    finally:
        torch.set_flush_denormal(False)
