"""Test collection of the examples: a test module whose import fails because torchvision (or timm, which imports it)
cannot load next to the installed torch is reported as skipped with that error, not as a collection error, and so is
a test that fails on that error (a torchvision model or op built inside the test). This is
the case of the PyPI torchvision wheels, built against the CUDA build of torch, next to a CPU-only torch (e.g. torch
2.13.0+cpu): ``import torchvision`` raises RuntimeError ("operator torchvision::nms does not exist"). Any other
import error still fails the collection."""
import pytest


def _torchvision_load_error() -> str | None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return None  # not installed: the modules that need it fail to collect, as they should
    except Exception as exc:  # noqa: BLE001 (installed but broken: any error while loading its operators)
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


TORCHVISION_LOAD_ERROR = _torchvision_load_error()


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if (TORCHVISION_LOAD_ERROR and report.failed and isinstance(collector, pytest.Module)
            and "torchvision" in str(report.longrepr)):
        import torch
        report.outcome = "skipped"
        report.longrepr = (str(collector.path), 0, f"Skipped: torchvision is installed but does not load with torch "
                                                   f"{torch.__version__}: {TORCHVISION_LOAD_ERROR}")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if (TORCHVISION_LOAD_ERROR and report.failed and call.excinfo is not None
            and "torchvision::" in str(call.excinfo.value)):
        import torch
        report.outcome = "skipped"
        report.longrepr = (str(item.path), 0, f"Skipped: needs torchvision, which does not load with torch "
                                              f"{torch.__version__}: {TORCHVISION_LOAD_ERROR}")
    return report
