"""The teacher cache, the product's core, as one package (docs/design.md section 3).

    store.py    the on-disk layout and the store formats (zarr, h5) behind one small protocol, the writer lock
    read.py     TeacherCache (open_cache), validate_caches, CacheConfig: the read side
    write.py    cache_teacher: the frozen teacher over every (sample, view) of the plan, resumable
    slabs.py    the training-time reader: view slabs per epoch or per window of chunks, prefetched; cached or online targets
    frame.py    the pandas face: soft_labels(), one row per (sample, view, teacher)

    from pipeline.cache import open_cache, soft_labels

The modules import each other by their own names (`pipeline.cache.read`), never through the package, and
nothing the package imports imports it back (the view plan's atomic swap lives in pipeline.checkpoints).
"""

from pipeline.cache.frame import soft_labels
from pipeline.cache.read import CACHE_FORMAT, CacheConfig, TeacherCache, open_cache, rerun_hint, validate_caches
from pipeline.cache.slabs import (CachedTargets, CacheSlabs, EpochReads, FkdTargets, NoTargets, OnlineTargets,
                                  SlabLoader)
from pipeline.cache.write import cache_teacher, verify_cache

__all__ = ["CACHE_FORMAT", "CacheConfig", "TeacherCache", "open_cache", "rerun_hint", "validate_caches",
           "cache_teacher", "verify_cache", "CachedTargets", "CacheSlabs", "FkdTargets", "EpochReads", "NoTargets", "OnlineTargets",
           "SlabLoader", "soft_labels"]
