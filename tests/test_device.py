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


def test_fused_optimizers_step_as_the_plain_ones_do():
    """The fused kernels (fused_optimizer) against torch's plain for-loop optimizers: SGD with Nesterov
    momentum and weight decay, and the discriminators' Adam, over a few steps."""
    from pipeline.device import fused_optimizer

    torch.manual_seed(0)
    makers = {
        "sgd": lambda p, **kw: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, **kw),
        "adam": lambda p, **kw: torch.optim.Adam(p, lr=1e-2, betas=(0.5, 0.999), weight_decay=1e-3, **kw),
    }
    for name, make in makers.items():
        start = torch.randn(50)
        fused_p, plain_p = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        fused, plain = make([fused_p], **fused_optimizer()), make([plain_p], foreach=False)
        for _ in range(5):
            grad = torch.randn(50)
            fused_p.grad, plain_p.grad = grad.clone(), grad.clone()
            fused.step()
            plain.step()
        torch.testing.assert_close(fused_p, plain_p, rtol=1e-6, atol=1e-6, msg=name)


def test_bounded_heap_sets_glibcs_threshold_where_there_is_glibc():
    """The file source's memory fix (pipeline.device.bounded_heap; its effect is measured by bench.files): it
    takes on glibc, and is a no-op reporting False elsewhere."""
    import platform

    from pipeline.device import bounded_heap

    assert bounded_heap() is (platform.libc_ver()[0] == "glibc")
