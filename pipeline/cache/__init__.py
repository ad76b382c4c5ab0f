"""The teacher cache, the product's core, as one package (docs/design.md section 3).

    store.py    the on-disk layout and the store formats (zarr, h5) behind one small protocol, the writer lock
    read.py     TeacherCache (open_cache), validate_caches, CacheConfig: the read side
    write.py    cache_teacher: the frozen teacher over every (sample, view) of the plan, resumable
    slabs.py    the training-time reader: one view slab per epoch, prefetched; cached or online targets
    frame.py    the pandas face: soft_labels(), one row per (sample, view, teacher)

    from pipeline.cache import open_cache, soft_labels

The names below are loaded from their module on first use, so importing one module of the package (as
pipeline.views does with `pipeline.cache.store`) loads that module alone: the package's own import never
pulls in its siblings, which would make a cycle (write and frame import pipeline.views). The modules
import each other by their own names (`pipeline.cache.read`), never through the package.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "read": ("CACHE_FORMAT", "CacheConfig", "TeacherCache", "open_cache", "rerun_hint", "validate_caches"),
    "write": ("cache_teacher", "verify_cache"),
    "slabs": ("CachedTargets", "CacheSlabs", "NoTargets", "OnlineTargets", "SlabLoader"),
    "frame": ("soft_labels",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
