"""The on-disk layout of one teacher cache, in zarr v3 or HDF5, behind one small interface.

    logits             (N, V, C)  float16   dims (sample, view, class)
    features/<block>   (N, V, L)  float16   dims (sample, view, feature)
    done               (n_chunks,) uint8    dims (chunk,)   1 once chunk k's rows are written
    attrs              identity and layout (see pipeline.cache.write.identity_attrs), `complete`

Chunk k covers sample rows [k * R, (k + 1) * R) of every array, all views; on disk each array is
chunked (R, 1, width), so one view slab `[:, v]` (the per-epoch read) touches N / R contiguous chunks
and nothing of the other views, while the writer's unit (R rows x all views) is V whole chunks per
array that no other chunk index shares. Ownership is a function of k alone, whatever the number of
writers. R and the codec were chosen by measurement (`python -m bench.cache_io --sweep`, see
`pipeline.cache.CacheConfig`).

Float arrays use NaN as the fill value, so a region nobody wrote reads as NaN, never as plausible zeros;
`done` is what says which rows are real. Every chunk carries a checksum (zarr v3's crc32c codec, HDF5's
Fletcher32 filter), verified on every read; `read_rows` names the chunk a failed read or a NaN belongs
to (`ChunkError`), so a damaged store ends in one line saying which chunk to rebuild. HDF5 cannot hold dict or list attributes, so those are stored
as JSON strings and their names listed in the `json_attrs` attribute.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("zarr", "h5")
CODECS = ("none", "zstd", "blosc", "lzf", "gzip")  # zstd/blosc: zarr only; lzf/gzip: h5 only
FORMAT_CODECS = {"zarr": ("none", "zstd", "blosc"), "h5": ("none", "lzf", "gzip")}
DIMS = {"logits": ("sample", "view", "class")}
FEATURE_DIMS = ("sample", "view", "feature")


@dataclass(frozen=True)
class Layout:
    num_samples: int  # N
    num_views: int  # V
    num_classes: int  # C
    blocks: tuple[str, ...]  # block names, e.g. ("block1", "block2", "block3")
    feature_lengths: tuple[int, ...]  # L per block: the aligned length of its vector
    chunk_rows: int  # R, sample rows per chunk (the write and resume unit)
    codec: str  # one of FORMAT_CODECS[format]
    checksum: bool = True  # a crc32c (zarr) or Fletcher32 (h5) checksum on every chunk, verified on read

    @property
    def n_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_rows)

    def widths(self) -> dict[str, int]:
        """Array name -> last-axis width: logits first, then the blocks in order."""
        return {"logits": self.num_classes, **{f"features/{b}": n for b, n in zip(self.blocks, self.feature_lengths)}}

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
    if np.isnan(value).any():
        raise ChunkError(name, k, (start, stop), "holds unwritten (NaN) values")
    return value


def read_view(store, layout: Layout, name: str, view: int, rows: np.ndarray | None = None) -> np.ndarray:
    """View `view` of array `name`, read and verified chunk by chunk: every sample (N, W), or only the sorted
    sample indexes `rows` (n, W) (a rank's rows: each chunk is read, only its rows are kept in memory)."""
    wanted = np.arange(layout.num_samples) if rows is None else np.asarray(rows, dtype=np.int64)
    out = np.empty((len(wanted), layout.widths()[name]), dtype=np.float16)
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


def format_of(path: str | Path) -> str:
    """`zarr` or `h5` from the path's suffixes: `x.h5` (and its temp names `x.h5.new`...) is HDF5, else zarr."""
    return "h5" if any(s.lower() in (".h5", ".hdf5") for s in Path(path).suffixes) else "zarr"


def create_store(path: Path, layout: Layout, attrs: dict[str, Any]):
    """A new, empty store at `path` (which must not exist); returns it open for writing."""
    fmt = format_of(path)
    return (H5Store if fmt == "h5" else ZarrStore).create(path, layout, attrs)


def open_store(path: Path, writable: bool = False):
    fmt = format_of(path)
    return (H5Store if fmt == "h5" else ZarrStore)(path, writable)


# ---------------------------------------------------------------- zarr v3


class ZarrStore:
    format = "zarr"

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
            root.create_array(
                name, shape=(layout.num_samples, layout.num_views, width),
                chunks=(layout.chunk_rows, 1, width), dtype="float16", fill_value=np.nan,
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


class H5Store:
    format = "h5"

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
                ds = f.create_dataset(
                    name, shape=(layout.num_samples, layout.num_views, width), dtype="float16",
                    chunks=(min(layout.chunk_rows, layout.num_samples), 1, width), fillvalue=np.nan,
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


@contextlib.contextmanager
def writer_lock(store: Path):
    """Hold the one-writer lock of the store at `store` (`<store>.lock` beside it) for the block.

    An exclusive `fcntl.flock`, which the kernel drops when its process dies: a killed writer leaves no
    lock that blocks a rerun. A second writer ends at once in one line naming the process that holds it.
    """
    from pipeline.config import UserError

    lock = store.with_name(store.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a+")
    except OSError as exc:
        raise UserError(f"cannot write the cache at {store} ({exc.strerror or exc}): choose a writable location "
                        f"or fix the permissions of {store.parent}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"cache {store} is being written by {holder}: wait for it to finish, or stop it "
                            f"and rerun") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()  # the file stays (unlinking it could let two writers lock two inodes)
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_path(path: Path) -> None:
    """Delete a store (zarr folder or h5 file) or any leftover temp path; absent is fine."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def swap_in(new: Path, final: Path) -> None:
    """Replace `final` (file or folder, may be absent) by the finished `new`, never losing both.

    The old one is renamed aside to `<final>.old` first and deleted only after `new` took its place;
    `pipeline.cache.write.recover_swap` finishes the job if a run dies in between.
    """
    old = final.with_name(final.name + ".old")
    remove_path(old)
    if final.exists():
        final.rename(old)
    new.rename(final)
    remove_path(old)
