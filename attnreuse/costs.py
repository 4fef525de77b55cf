"""What one attention layer costs on this GPU, per call, computing, capturing and reusing its map: measured,
kept on disk, and read by the default plan (``plan="measured"``).

An entry is keyed by the layer's shape (:class:`~attnreuse.planner.LayerShape`), the map format, the model's
dtype, the backend and the **mode**:

* ``"eager"``: what an eager caller waits for: wall time of back-to-back calls, the device synchronised
  around them (:func:`attnreuse.timing.wall_ms`), so a host-bound layer costs its host time (Python,
  dispatch, kernel launches) and a GPU-bound one its GPU time;
* ``"graphed"``: one CUDA-graph replay of the call, timed with CUDA events: GPU time alone, as under CUDA
  graphs or ``torch.compile(mode="reduce-overhead")``.

Tables live in one JSON file per (GPU name, NVIDIA driver, torch, Triton, attnreuse version) in
:func:`cache_dir` (``$ATTNREUSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/attnreuse``, else ``~/.cache/attnreuse``),
written atomically (temporary file, then rename) and read once per process. A corrupt or foreign file is
ignored with a warning and its costs measured again; a folder that cannot be written keeps the costs in
memory for the process (one warning). ``python -m attnreuse warmup`` fills the table ahead
(:func:`measure_costs`); otherwise the first generation of each input shape measures what it needs.

Only GPUs get a table by default (:class:`MeasuredCosts`): on a CPU or MPS, ``plan="measured"`` reuses every
selected layer, without timing anything. ``max_cache_bytes`` and ``cache_dtype="auto"`` plan on any device:
off a GPU with costs timed in memory (:func:`unstored_cost`), as before.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import tempfile
import threading
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from . import kernels
from .kernels import MapFormat
from .kernels import formats as map_formats
from .kernels.reference import merge_heads, split_heads
from .planner import CostFn, LayerCost, LayerShape, layer_shapes
from .timing import graphed, median_ms, wall_ms

MODES = ("eager", "graphed")
TABLE_VERSION = 1  # of the file's layout
EntryKey = tuple  # (LayerShape, format name, model dtype name, backend, mode)
Measure = Callable[..., LayerCost]  # (shape, fmt, device, model_dtype, backend, mode) -> LayerCost


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: pass 'eager' (an eager caller: host launch overhead included) or "
                         "'graphed' (CUDA graphs, torch.compile(mode='reduce-overhead'): GPU time alone)")
    return mode


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def entry_key(shape: LayerShape, fmt: MapFormat | str, model_dtype: torch.dtype, backend: str,
              mode: str) -> EntryKey:
    return (shape, map_formats.get(fmt).name, _dtype_name(model_dtype), backend, mode)


# ---- what a table is keyed by ------------------------------------------------------------------------------

def device_name(device: torch.device | str) -> str:
    """The GPU's name (``torch.cuda.get_device_name``), else the device type (``"cpu"``, ``"mps"``)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _driver_version() -> str:
    """The NVIDIA driver (e.g. ``"550.54.15"``, from NVML), else CUDA's driver API version, else ``"unknown"``."""
    try:
        import pynvml  # shipped as nvidia-ml-py; torch uses it too where installed
        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 (not installed, no NVML: fall through)
        pass
    try:
        return f"cuda-driver-api-{torch._C._cuda_getDriverVersion()}"
    except Exception:  # noqa: BLE001
        return "unknown"


def _package_version(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


@functools.lru_cache(maxsize=None)
def _attnreuse_version() -> str:
    """The package's version and a hash of its kernels' source: a table measured with other kernels is stale
    (the version number alone stays the same across commits)."""
    version = _package_version("attnreuse")
    if version == "none":  # run from a source tree without installing: the package's own (imported by now)
        version = getattr(sys.modules.get("attnreuse"), "__version__", "unknown")
    source = hashlib.sha256()
    for path in sorted(Path(kernels.__file__).parent.glob("*.py")):
        source.update(path.read_bytes())
    return f"{version}+{source.hexdigest()[:12]}"


@functools.lru_cache(maxsize=None)
def _device_key(device_type: str, index: int | None) -> tuple:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    triton = _package_version("triton")
    if triton == "none":
        triton = _package_version("pytorch-triton")
    return (("gpu", device_name(device)), ("driver", _driver_version() if device_type == "cuda" else "none"),
            ("torch", torch.__version__), ("triton", triton), ("attnreuse", _attnreuse_version()))


def device_key(device: torch.device | str) -> dict:
    """What a table is valid for: ``{"gpu", "driver", "torch", "triton", "attnreuse"}``; another value of any
    of them is another table (measured again)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return dict(_device_key(device.type, device.index))


def cache_dir() -> Path:
    """``$ATTNREUSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/attnreuse``, else ``~/.cache/attnreuse``."""
    if os.environ.get("ATTNREUSE_CACHE_DIR"):
        return Path(os.environ["ATTNREUSE_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "attnreuse"
    return Path.home() / ".cache" / "attnreuse"


# ---- the tables on disk ------------------------------------------------------------------------------------

_SHAPE_FIELDS = tuple(f.name for f in fields(LayerShape))
_COST_FIELDS = tuple(f.name for f in fields(LayerCost))


def _entry_json(key: EntryKey, cost: LayerCost) -> dict:
    shape, fmt, dtype, backend, mode = key
    return {**asdict(shape), "format": fmt, "dtype": dtype, "backend": backend, "mode": mode,
            **{f"{name}_ms": value for name, value in asdict(cost).items()}}


def _entry_from_json(item: dict) -> tuple[EntryKey, LayerCost]:
    shape = LayerShape(**{name: int(item[name]) for name in _SHAPE_FIELDS})
    cost = LayerCost(**{name: float(item[f"{name}_ms"]) for name in _COST_FIELDS})
    key = (shape, str(item["format"]), str(item["dtype"]), str(item["backend"]), check_mode(item["mode"]))
    return key, cost


class CostStore:
    """Cost tables by device key (:func:`device_key`), each read once from its file in ``folder``
    (default: :func:`cache_dir`, resolved at first use) and written back as entries are measured."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self._folder = None if folder is None else Path(folder)
        self._tables: dict[tuple, dict[EntryKey, LayerCost]] = {}
        self._unwritable = False
        self._lock = threading.RLock()

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = cache_dir()
        return self._folder

    def path(self, key: dict) -> Path:
        """The file of ``key``'s table: the GPU's name and a hash of the whole key."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9]+", "-", str(key.get("gpu", "device"))).strip("-")[:40] or "device"
        return self.folder / f"costs-{slug}-{digest}.json"

    def table(self, key: dict) -> dict[EntryKey, LayerCost]:
        """``key``'s entries (read from disk the first time)."""
        with self._lock:
            k = tuple(sorted(key.items()))
            if k not in self._tables:
                self._tables[k] = self._read(key, quiet=False) or {}
            return self._tables[k]

    def get(self, key: dict, entry: EntryKey) -> LayerCost | None:
        return self.table(key).get(entry)

    def put(self, key: dict, entries: dict[EntryKey, LayerCost]) -> None:
        """Add ``entries`` to ``key``'s table and write it (merged with what another process wrote since)."""
        with self._lock:
            table = self.table(key)
            table.update(entries)
            if self._unwritable:
                return
            merged = {**(self._read(key, quiet=True) or {}), **table}
            path = self.path(key)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_atomically(path, {"attnreuse_costs": TABLE_VERSION, "key": key,
                                         "entries": [_entry_json(k, c) for k, c in merged.items()]})
            except OSError as e:
                self._unwritable = True
                warnings.warn(f"attnreuse: cannot write the cost table to {path.parent} ({e.strerror or e}); the "
                              "costs measured stay in memory for this process only: set ATTNREUSE_CACHE_DIR to a "
                              "writable folder to keep them", stacklevel=2)
            table.update(merged)

    def clear(self) -> None:
        """Forget what was read (the next lookup reads the files again)."""
        with self._lock:
            self._tables.clear()
            self._unwritable = False

    def _read(self, key: dict, quiet: bool) -> dict[EntryKey, LayerCost] | None:
        path = self.path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("attnreuse_costs") != TABLE_VERSION:
                raise ValueError("not an attnreuse cost table of this version")
            if data.get("key") != key:
                raise ValueError(f"it holds the costs of {data.get('key')}, not of {key}")
            return dict(_entry_from_json(item) for item in data["entries"])
        except (FileNotFoundError, NotADirectoryError):  # no table yet (or no folder: said when writing)
            return None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            if not quiet:
                warnings.warn(f"attnreuse: ignoring the cost table {path} ({e}); its costs are measured again",
                              stacklevel=3)
            return None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()


def _write_atomically(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


STORE = CostStore()  # the process's tables, in cache_dir()


# ---- measuring -----------------------------------------------------------------------------------------------

@torch.no_grad()
def measure_layer(s: LayerShape, fmt: MapFormat | str, device: torch.device | str, model_dtype: torch.dtype,
                  backend: str = "auto", mode: str = "eager") -> LayerCost:
    """Time one layer's computing, capturing and reusing call on ``device`` in ``mode``: ``to_q`` and ``to_k``
    plus SDPA (heads merged back, as diffusers' processor does), or plus ``kernels.capture``; and
    ``kernels.cached_pv``. What every step also runs (``to_v``, ``to_out``) is left out: it cancels."""
    device, fmt = torch.device(device), map_formats.get(fmt)
    check_mode(mode)
    if mode == "graphed" and device.type != "cuda":
        raise ValueError(f"mode='graphed' times CUDA-graph replays: it needs a CUDA device, not {device}")
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size, scale=1.0):
        return torch.randn(*size, device=device, dtype=model_dtype, generator=gen) * scale

    hs, ctx = rand(s.batch, s.q_tokens, s.q_dim), rand(s.batch, s.kv_tokens, s.kv_dim)
    inner = s.heads * s.head_dim
    wq, wk = rand(inner, s.q_dim, scale=s.q_dim ** -0.5), rand(inner, s.kv_dim, scale=s.kv_dim ** -0.5)
    v = rand(s.batch, s.kv_tokens, inner)

    def compute():
        q, k = F.linear(hs, wq), F.linear(ctx, wk)
        return merge_heads(F.scaled_dot_product_attention(split_heads(q, s.heads), split_heads(k, s.heads),
                                                          split_heads(v, s.heads)))

    def capture():
        return kernels.capture(F.linear(hs, wq), F.linear(ctx, wk), v, s.heads, s.head_dim ** -0.5, fmt,
                               backend=backend)

    cmap = capture()[1]

    def reuse():
        return kernels.cached_pv(cmap, v, s.heads, backend=backend)

    if mode == "graphed":
        def time(fn):  # GPU time of one replay; a constant launch overhead cancels in the plan's differences
            graph = graphed(fn)
            try:
                return median_ms(graph.replay, device)
            finally:
                del graph
    else:
        def time(fn):
            return wall_ms(fn, device)
    return LayerCost(compute=time(compute), capture=time(capture), reuse=time(reuse))


def _lookup_or_measure(store: CostStore | None, key: dict | None, shape: LayerShape, fmt: MapFormat,
                       device: torch.device, model_dtype: torch.dtype, backend: str, mode: str,
                       measure: Measure) -> tuple[LayerCost, bool]:
    """``(cost, measured now)``: from ``store``'s table under ``key``, else measured (and stored)."""
    entry = entry_key(shape, fmt, model_dtype, backend, mode)
    if store is not None:
        found = store.get(key, entry)
        if found is not None:
            return found, False
    cost = measure(shape, fmt, device, model_dtype, backend, mode)
    if store is not None:
        store.put(key, {entry: cost})
    return cost, True


def measure_costs(shapes: Iterable[LayerShape], formats: Iterable[MapFormat | str], device: torch.device | str,
                  dtype: torch.dtype, modes: Iterable[str] = MODES, backend: str = "auto", *,
                  store: CostStore | None = None, persist: bool = True, key: dict | None = None,
                  measure: Measure | None = None) -> dict[EntryKey, LayerCost]:
    """Every (shape, map format, mode) entry of ``device``'s cost table for a model of ``dtype``: taken from
    the table where it is already, measured (and written to the table on disk) where not. For
    ``python -m attnreuse warmup``: the first generation then times nothing.

    Returns ``{(shape, format name, dtype name, backend, mode): LayerCost}``. ``persist=False``: measure without
    reading or writing any table (e.g. a CPU's costs for a report). ``store``: another :class:`CostStore`
    (default :data:`STORE`); ``key``: another table key (default :func:`device_key`); ``measure``: another
    timer with :func:`measure_layer`'s arguments.
    """
    device = torch.device(device)
    modes = tuple(check_mode(m) for m in modes)  # "graphed" off a GPU: measure_layer says it needs one
    store = (store or STORE) if persist else None
    key = key or (device_key(device) if store is not None else None)
    measure = measure or measure_layer
    out = {}
    for shape in dict.fromkeys(shapes):
        for fmt in dict.fromkeys(map_formats.get(f) for f in formats):
            for mode in modes:
                cost, _ = _lookup_or_measure(store, key, shape, fmt, device, dtype, backend, mode, measure)
                out[entry_key(shape, fmt, dtype, backend, mode)] = cost
    return out


def shapes_of(model: torch.nn.Module, sample_shape: tuple[int, ...], context_tokens: int,
              layers: Iterable[str] | None = None) -> list[LayerShape]:
    """The distinct attention shapes of one call of ``model`` (a diffusers UNet or DiT; built on the meta device
    is enough) for a ``sample_shape`` input and ``context_tokens`` text tokens: what to :func:`measure_costs`."""
    from diffusers.models.attention_processor import Attention

    names = list(layers) if layers is not None else [n for n, m in model.named_modules() if isinstance(m, Attention)]
    return list(dict.fromkeys(layer_shapes(model, names, tuple(sample_shape), context_tokens).values()))


# ---- cost models for plans ------------------------------------------------------------------------------------

class MeasuredCosts:
    """The default cost model of a patch (``handle.plans.cost``): the table of the GPU at hand in the plan's
    mode, measuring (and storing) an entry the first time a plan needs it.

    ``device_types``: the devices that get a table (default ``("cuda",)``); on others it returns None: no costs,
    so every selected layer reuses. ``store``, ``key``, ``measure``: as in :func:`measure_costs` (for tests and
    tools; the default reads and writes :func:`cache_dir`).
    """

    def __init__(self, store: CostStore | None = None, key: dict | Callable[[torch.device], dict] | None = None,
                 measure: Measure | None = None, device_types: tuple[str, ...] = ("cuda",)):
        self.store, self.key, self.measure, self.device_types = store, key, measure, tuple(device_types)

    def __call__(self, device: torch.device, model_dtype: torch.dtype, backend: str = "auto",
                 mode: str = "eager") -> CostFn | None:
        device = torch.device(device)
        check_mode(mode)
        if device.type not in self.device_types:
            return None
        store = self.store or STORE
        key = self.key(device) if callable(self.key) else (self.key or device_key(device))
        measure = self.measure or measure_layer

        def cost(shape: LayerShape, fmt: MapFormat) -> LayerCost:
            return _lookup_or_measure(store, key, shape, fmt, device, model_dtype, backend, mode, measure)[0]
        return cost

    def __repr__(self) -> str:
        return f"MeasuredCosts(device_types={self.device_types})"


_UNSTORED: dict[tuple, LayerCost] = {}  # off-GPU costs for max_cache_bytes / "auto": this process only


def unstored_cost(device: torch.device, model_dtype: torch.dtype, backend: str = "auto",
                  mode: str = "eager") -> CostFn:
    """Costs timed once per shape on ``device`` and kept in memory only: what ``max_cache_bytes`` and
    ``cache_dtype="auto"`` plan with where :class:`MeasuredCosts` has no table (a CPU, MPS)."""
    device = torch.device(device)

    def cost(shape: LayerShape, fmt: MapFormat) -> LayerCost:
        entry = (device_name(device), *entry_key(shape, fmt, model_dtype, backend, mode))
        if entry not in _UNSTORED:
            _UNSTORED[entry] = measure_layer(shape, fmt, device, model_dtype, backend, mode)
        return _UNSTORED[entry]
    return cost
