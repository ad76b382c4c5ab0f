"""The on-disk layout of one teacher cache, in any registered store format (zarr v3, HDF5), and the writer lock.

    logits             (N, V, C)  float16   dims (sample, view, class)      cache.logits: full
    topk/logits        (N, V, k)  float16   dims (sample, view, rank)       cache.logits: topk, instead:
    topk/classes       (N, V, k)  uint16    dims (sample, view, rank)         the k largest logits, their
    topk/lse           (N, V, 1)  float16   dims (sample, view, one)          classes and log-sum-exp of all C
    features/<block>   (N, V, L)  float16   dims (sample, view, feature)
    done               (n_chunks,) uint8    dims (chunk,)   1 once chunk k's rows are written
    attrs              identity and layout (see pipeline.cache.write.identity_attrs), `complete`

Chunk k covers sample rows [k * R, (k + 1) * R) of every array, all views; on disk each array is
chunked (R, 1, width), so one view slab `[:, v]` (the per-epoch read) touches N / R contiguous chunks
and nothing of the other views, while the writer's unit (R rows x all views) is V whole chunks per
array that no other chunk index shares. Ownership is a function of k alone, whatever the number of
writers. R and the codec were chosen by measurement (`python -m bench.cache_io --sweep`, see
`pipeline.cache.CacheConfig`).

Float arrays use NaN as the fill value (the uint16 class indexes 65,535), so a region nobody wrote reads as
NaN, never as plausible zeros;
`done` is what says which rows are real. Every chunk carries a checksum (zarr v3's crc32c codec, HDF5's
Fletcher32 filter), verified on every read; `read_rows` names the chunk a failed read or a NaN belongs
to (`ChunkError`), so a damaged store ends in one line saying which chunk to rebuild. HDF5 cannot hold
dict or list attributes, so those are stored as JSON strings and their names listed in `json_attrs`.

Store formats. A format is one class that provides the `StoreFormat` protocol, registered by name with
`@register_format`; `FORMATS` maps each name to its class. Nothing outside the format classes names a format:
`format_of` (a path's format, from the registered suffixes), `create_store` and `open_store`, `CacheConfig`
(its `format` and `codec` checked against the registry), the stage's `--format` choice, `rerun_hint` and the
refusal of a format without parallel writers under torchrun all read the registry. `DEFAULT_FORMAT` (zarr)
is the one a path without a registered suffix is taken for. To add a format, write one class here:

    @register_format
    class ParquetStore:
        name = "parquet"                     # the --format value; stores are named NAME.parquet
        label = "a Parquet store"            # how a message names one store of the format
        suffixes = (".parquet",)             # every suffix read as this format; ".<name>" among them
        codecs = ("none", "zstd")            # what cache.codec may name ("none" first)
        parallel_writers = False             # can several processes write distinct chunks at once?

        def __init__(self, path, writable=False): ...    # open an existing store
        @classmethod
        def create(cls, path, layout, attrs): ...        # a new, empty store at `path`, open for writing
        # attrs, update_attrs, array, done, write_rows, mark_done, flush, close: see StoreFormat

and give it the same guarantees as the two here: NaN fill, checksummed chunks, `done` markers that
writers of different chunks never share, bytes that depend on the chunk index alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from pipeline.checkpoints import exclusive_lock

DIMS = {"logits": ("sample", "view", "class"), "topk/logits": ("sample", "view", "rank"),
        "topk/classes": ("sample", "view", "rank"), "topk/lse": ("sample", "view", "one")}
FEATURE_DIMS = ("sample", "view", "feature")
UNWRITTEN_INDEX = np.iinfo(np.uint16).max  # the fill of a uint16 array: no class index (C <= 65,535) is this


@dataclass(frozen=True)
class Layout:
    num_samples: int  # N
    num_views: int  # V
    num_classes: int  # C
    blocks: tuple[str, ...]  # block names, e.g. ("block1", "block2", "block3")
    feature_lengths: tuple[int, ...]  # L per block: the aligned length of its vector
    chunk_rows: int  # R, sample rows per chunk (the write and resume unit)
    codec: str  # one of the format's `codecs`
    checksum: bool = True  # a checksum on every chunk (zarr: crc32c, h5: Fletcher32), verified on read
    topk: int = 0  # 0: full logits (N, V, C); k: the top-k logits, their classes and the log-sum-exp instead

    @property
    def n_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_rows)

    def widths(self) -> dict[str, int]:
        """Array name -> last-axis width: the logits (or their top-k form) first, then the blocks in order."""
        logits = ({"logits": self.num_classes} if not self.topk else
                  {"topk/logits": self.topk, "topk/classes": self.topk, "topk/lse": 1})
        return {**logits, **{f"features/{b}": n for b, n in zip(self.blocks, self.feature_lengths)}}

    @staticmethod
    def dtype(name: str) -> np.dtype:
        """Every array is fp16 but the top-k class indexes, uint16."""
        return np.dtype(np.uint16 if name == "topk/classes" else np.float16)

    def rows(self, k: int) -> tuple[int, int]:
        """The sample rows [start, stop) of chunk k."""
        return k * self.chunk_rows, min(self.num_samples, (k + 1) * self.chunk_rows)

    def chunk_of(self, row: int) -> int:
        return row // self.chunk_rows

    def to_attrs(self) -> dict[str, Any]:
        return {"chunk_rows": self.chunk_rows, "codec": self.codec, "checksum": self.checksum}


def layout_from_attrs(attrs: dict[str, Any]) -> Layout:
    return Layout(
        num_samples=attrs["num_samples"], num_views=attrs["num_views"], num_classes=attrs["num_classes"],
        blocks=tuple(attrs["blocks"]), feature_lengths=tuple(attrs["dims"][b] for b in attrs["blocks"]),
        chunk_rows=attrs["chunk_rows"], codec=attrs["codec"], checksum=bool(attrs.get("checksum", False)),
        topk=int(attrs.get("topk", 0)),  # stores from before top-k hold full logits and no such attr
    )


class ChunkError(Exception):
    """Chunk `chunk` of array `array` could not be read back as written: `reason` says how."""

    def __init__(self, array: str, chunk: int, rows: tuple[int, int], reason: str):
        super().__init__(f"chunk {chunk} of {array} (rows {rows[0]}-{rows[1] - 1}) {reason}")
        self.array, self.chunk, self.rows, self.reason = array, chunk, rows, reason


def read_rows(store, layout: Layout, name: str, k: int, view: int | None = None) -> np.ndarray:
    """Chunk k's rows of array `name` (all views, or one), verified: a checksum or decoding failure, or a
    NaN (a region no writer filled: a lost chunk file), raises ChunkError."""
    start, stop = layout.rows(k)
    try:
        arr = store.array(name)
        value = np.asarray(arr[start:stop] if view is None else arr[start:stop, view])
    except Exception as exc:  # zarr: ValueError on a checksum mismatch; h5py: OSError from the filter
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
        raise ChunkError(name, k, (start, stop), f"is damaged ({type(exc).__name__}: {first})") from None
    if np.isnan(value).any() if value.dtype.kind == "f" else (value == UNWRITTEN_INDEX).any():
        raise ChunkError(name, k, (start, stop), "holds unwritten (NaN) values")
    return value


def read_view(store, layout: Layout, name: str, view: int, rows: np.ndarray | None = None) -> np.ndarray:
    """View `view` of array `name`, read and verified chunk by chunk: every sample (N, W), or only the sorted
    sample indexes `rows` (n, W) (a rank's rows: each chunk is read, only its rows are kept in memory)."""
    wanted = np.arange(layout.num_samples) if rows is None else np.asarray(rows, dtype=np.int64)
    out = np.empty((len(wanted), layout.widths()[name]), dtype=layout.dtype(name))
    bounds = np.searchsorted(wanted, [layout.rows(k)[0] for k in range(layout.n_chunks)] + [layout.num_samples])
    for k in range(layout.n_chunks):
        lo, hi = bounds[k], bounds[k + 1]
        if lo == hi:
            continue  # none of the wanted rows in this chunk
        values = read_rows(store, layout, name, k, view)
        out[lo:hi] = values if rows is None else values[wanted[lo:hi] - layout.rows(k)[0]]
    return out


def damaged_chunks(store, layout: Layout) -> dict[int, list[str]]:
    """Every chunk whose rows or `done` marker do not read back as written: chunk -> the arrays at fault.
    Chunks not marked done are not checked (they are still to be written)."""
    bad: dict[int, list[str]] = {}
    for k, done in enumerate(store.done()):
        if not done:
            continue
        for name in layout.widths():
            try:
                read_rows(store, layout, name, k)
            except ChunkError:
                bad.setdefault(k, []).append(name)
    return bad


# ---------------------------------------------------------------- the format protocol and registry


class StoreFormat(Protocol):
    """What a store format class provides (see the module docstring to add one)."""

    name: ClassVar[str]  # the registry key, the --format value and the suffix of a pipeline store (NAME.<name>)
    label: ClassVar[str]  # one store of the format in a message, article included ("an HDF5 store")
    suffixes: ClassVar[tuple[str, ...]]  # lower-case path suffixes read as this format, ".<name>" among them
    codecs: ClassVar[tuple[str, ...]]  # the codecs a Layout may name for this format, "none" (no codec) first
    parallel_writers: ClassVar[bool]  # several processes may write distinct chunks of one store at once
    path: Path

    def __init__(self, path: Path, writable: bool = False) -> None:
        """Open the existing store at `path`, for reading or (`writable`) for writing too."""

    @classmethod
    def create(cls, path: Path, layout: Layout, attrs: dict[str, Any]) -> "StoreFormat":
        """A new, empty store at `path` (which must not exist), open for writing: arrays NaN, `done` all 0."""

    @property
    def attrs(self) -> dict[str, Any]:
        """The store's attributes, as plain JSON values."""

    def update_attrs(self, values: dict[str, Any]) -> None:
        """Set some attributes (the others stay), durably before returning."""

    def array(self, name: str) -> Any:
        """The lazy on-disk array `name` (logits, features/<block>, done): numpy-style slicing reads and writes."""

    def done(self) -> np.ndarray:
        """The `done` markers (n_chunks,) uint8; a marker that fails its checksum counts as not done."""

    def write_rows(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write each (r, V, W) float16 value at rows [start, start + r) of its array, on disk before returning."""

    def mark_done(self, k: int, value: int = 1) -> None:
        """Set (or with 0 clear) chunk k's `done` marker, on disk before returning."""

    def flush(self) -> None:
        """Everything written so far on disk."""

    def close(self) -> None:
        """Release the store; closing twice is fine."""


FORMATS: dict[str, type[StoreFormat]] = {}  # name -> format class, filled by @register_format
_MEMBERS = tuple(StoreFormat.__annotations__) + tuple(n for n in vars(StoreFormat) if not n.startswith("_"))


def register_format(cls: type) -> type:
    """Class decorator: make `cls` (a StoreFormat) the format `cls.name`."""
    missing = [m for m in _MEMBERS if m != "path" and not hasattr(cls, m)]
    if missing:
        raise TypeError(f"store format {cls.__name__} lacks {', '.join(missing)} (see StoreFormat)")
    if f".{cls.name}" not in cls.suffixes or cls.codecs[:1] != ("none",):
        raise TypeError(f"store format {cls.__name__}: its suffixes must hold .{cls.name}, its codecs start with none")
    taken = {s for other in FORMATS.values() for s in other.suffixes}
    if cls.name in FORMATS or taken.intersection(cls.suffixes):
        raise TypeError(f"store format {cls.__name__}: name {cls.name!r} or one of its suffixes is registered already")
    FORMATS[cls.name] = cls
    return cls


def format_of(path: str | Path) -> str:
    """The format of a store path, by its last registered suffix (`x.h5` and its temp names `x.h5.new`... are
    h5); DEFAULT_FORMAT when it has none."""
    for suffix in reversed(Path(path).suffixes):
        for cls in FORMATS.values():
            if suffix.lower() in cls.suffixes:
                return cls.name
    return DEFAULT_FORMAT


def create_store(path: Path, layout: Layout, attrs: dict[str, Any]) -> StoreFormat:
    """A new, empty store at `path` (which must not exist), in the format of its suffix; open for writing."""
    return FORMATS[format_of(path)].create(path, layout, attrs)


def open_store(path: Path, writable: bool = False) -> StoreFormat:
    return FORMATS[format_of(path)](path, writable)


# ---------------------------------------------------------------- zarr v3


@register_format
class ZarrStore:
    """zarr v3 (a folder of chunk files): writers of distinct chunks touch distinct files, so any number of
    processes may write one store at once."""

    name = "zarr"
    label = "a zarr store"
    suffixes = (".zarr",)
    codecs = ("none", "zstd", "blosc")
    parallel_writers = True

    def __init__(self, path: Path, writable: bool = False):
        import zarr

        self.path = Path(path)
        self.root = zarr.open_group(str(self.path), mode="r+" if writable else "r", zarr_format=3)
        self._attrs = dict(self.root.attrs)
        self._arrays: dict[str, Any] = {}

    @classmethod
    def create(cls, path: Path, layout: Layout, attrs: dict[str, Any]) -> "ZarrStore":
        import zarr

        from zarr.codecs import Crc32cCodec

        root = zarr.open_group(str(path), mode="w-", zarr_format=3)
        # the checksum is the last bytes-to-bytes codec: it covers the compressed bytes as stored
        checksum = [Crc32cCodec()] if layout.checksum else []
        compressors = (_zarr_compressors(layout.codec) or []) + checksum or None
        for name, width in layout.widths().items():
            dtype = layout.dtype(name)
            root.create_array(
                name, shape=(layout.num_samples, layout.num_views, width), chunks=(layout.chunk_rows, 1, width),
                dtype=dtype, fill_value=np.nan if dtype.kind == "f" else UNWRITTEN_INDEX,
                compressors=compressors, dimension_names=DIMS.get(name, FEATURE_DIMS),
            )
        # one zarr chunk per marker, so writers of different chunks never rewrite each other's markers
        root.create_array("done", shape=(layout.n_chunks,), chunks=(1,), dtype="uint8", fill_value=0,
                          compressors=checksum or None, dimension_names=("chunk",))
        root.attrs.update(attrs)
        return cls(path, writable=True)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._attrs)

    def update_attrs(self, values: dict[str, Any]) -> None:
        self.root.attrs.update(values)  # zarr's local store rewrites zarr.json atomically
        self._attrs.update(values)

    def array(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = self.root[name]
        return self._arrays[name]

    def done(self) -> np.ndarray:
        """The `done` markers (n_chunks,); a marker that fails its checksum counts as not done."""
        try:
            return np.asarray(self.array("done")[...], dtype=np.uint8)
        except ValueError:
            return np.array([_marker(self.array("done"), k) for k in range(self.array("done").shape[0])], np.uint8)

    def write_rows(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        for name, value in arrays.items():  # value (r, V, W) float16
            self.array(name)[start:start + len(value)] = value

    def mark_done(self, k: int, value: int = 1) -> None:
        self.array("done")[k] = value

    def flush(self) -> None:
        pass  # every zarr write is already a finished file

    def close(self) -> None:
        self._arrays.clear()


DEFAULT_FORMAT = ZarrStore.name  # cache.format's default, and the format of a path without a registered suffix


def _marker(done, k: int) -> int:
    try:
        return int(done[k])
    except (ValueError, OSError):
        return 0


def _zarr_compressors(codec: str):
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec == "none":
        return None
    if codec == "zstd":
        return [ZstdCodec(level=1)]
    if codec == "blosc":  # byte-shuffled lz4: the fast choice for float16 features
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2)]
    raise ValueError(f"codec {codec!r} is not available for zarr")


# ---------------------------------------------------------------- HDF5


@register_format
class H5Store:
    """HDF5 through h5py (one file): one writing process only, as h5py has no safe parallel writer without
    MPI, and gathering every chunk to one rank would make that rank the bottleneck."""

    name = "h5"
    label = "an HDF5 store"
    suffixes = (".h5", ".hdf5")
    codecs = ("none", "lzf", "gzip")
    parallel_writers = False

    def __init__(self, path: Path, writable: bool = False):
        import h5py

        self.path = Path(path)
        self.file = h5py.File(self.path, "r+" if writable else "r")
        self._attrs = _h5_read_attrs(self.file.attrs)

    @classmethod
    def create(cls, path: Path, layout: Layout, attrs: dict[str, Any]) -> "H5Store":
        import h5py

        kwargs = _h5_filters(layout.codec)
        with h5py.File(path, "w-") as f:
            for name, width in layout.widths().items():
                dtype = layout.dtype(name)
                ds = f.create_dataset(
                    name, shape=(layout.num_samples, layout.num_views, width), dtype=dtype,
                    chunks=(min(layout.chunk_rows, layout.num_samples), 1, width),
                    fillvalue=np.nan if dtype.kind == "f" else UNWRITTEN_INDEX,
                    fletcher32=layout.checksum, **kwargs,
                )
                for axis, label in enumerate(DIMS.get(name, FEATURE_DIMS)):
                    ds.dims[axis].label = label
            done = f.create_dataset("done", shape=(layout.n_chunks,), dtype="uint8", fillvalue=0,
                                    chunks=(1,), fletcher32=layout.checksum)
            done.dims[0].label = "chunk"
            _h5_write_attrs(f.attrs, attrs)
        return cls(path, writable=True)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._attrs)

    def update_attrs(self, values: dict[str, Any]) -> None:
        _h5_write_attrs(self.file.attrs, {**self._attrs, **values})
        self._attrs.update(values)
        self.file.flush()

    def array(self, name: str):
        return self.file[name]

    def done(self) -> np.ndarray:
        """The `done` markers (n_chunks,); a marker that fails its checksum counts as not done."""
        try:
            return np.asarray(self.file["done"][...], dtype=np.uint8)
        except OSError:
            return np.array([_marker(self.file["done"], k) for k in range(self.file["done"].shape[0])], np.uint8)

    def write_rows(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            self.file[name][start:start + len(value)] = value
        self.file.flush()  # the rows reach the file before their `done` marker does

    def mark_done(self, k: int, value: int = 1) -> None:
        self.file["done"][k] = value
        self.file.flush()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def _h5_filters(codec: str) -> dict[str, Any]:
    if codec == "none":
        return {}
    if codec == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if codec == "gzip":
        return {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    raise ValueError(f"codec {codec!r} is not available for h5")


def _h5_write_attrs(target, attrs: dict[str, Any]) -> None:
    as_json = []
    for key, value in attrs.items():
        if isinstance(value, (bool, int, float, str)):
            target[key] = value
        else:  # dicts, lists, None: HDF5 has no such attribute type
            target[key] = json.dumps(value)
            as_json.append(key)
    target["json_attrs"] = json.dumps(sorted(as_json))


def _h5_read_attrs(source) -> dict[str, Any]:
    as_json = set(json.loads(source.get("json_attrs", "[]")))
    out: dict[str, Any] = {}
    for key, value in source.items():
        if key == "json_attrs":
            continue
        if isinstance(value, bytes):
            value = value.decode()
        if key in as_json:
            value = json.loads(value)
        elif isinstance(value, np.generic):
            value = value.item()  # numpy scalars -> plain bool / int / float
        out[key] = value
    return out


# ---------------------------------------------------------------- writing: one writer


def writer_lock(store: Path):
    """The one-writer lock of the store at `store` (`<store>.lock` beside it), held for a `with` block: a second
    writer ends at once in one line naming the process that holds it (pipeline.checkpoints.exclusive_lock)."""
    return exclusive_lock(store.with_name(store.name + ".lock"), f"cache {store}", f"cannot write the cache at {store}")
