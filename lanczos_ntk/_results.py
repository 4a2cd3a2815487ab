"""Frozen result objects that save to and load from JSON + NPZ.

Every result of the library is a frozen dataclass deriving from :class:`Result`. Arrays and
tensors go to an ``.npz`` file (no pickles), everything else to a ``.json`` file; both are
written under a temporary name and renamed, so a crash never leaves a half-written result.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Result", "ResultFileError", "Status", "atomic_write_bytes", "atomic_write_text", "load_result"]

_FORMAT = "lanczos_ntk.result/1"


class ResultFileError(ValueError):
    """A saved result that cannot be read back as written: truncated, edited, or its two files
    (``.json`` and ``.npz``) not a pair. The message names the file.
    """


class Status(str, enum.Enum):
    """Outcome of an iterative computation.

    ``ACCURACY_LIMITED``: the iteration converged but rounding in the operator's products keeps
    part of the answer short of the requested tolerance (see the result's ``converged`` mask).
    ``TOO_FEW_STEPS``: a quadrature with too few Lanczos steps for the quantity asked of it
    (the last step still changes the estimate by more than its stated error allows).
    """

    CONVERGED = "converged"
    ACCURACY_LIMITED = "accuracy_limited"
    TOO_FEW_STEPS = "too_few_steps"
    MAX_ITERATIONS = "max_iterations"
    BREAKDOWN = "breakdown"
    FAILED = "failed"
    PARTIAL = "partial"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are ordinary files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _encode(value: Any, arrays: dict[str, np.ndarray], key: str) -> Any:
    if isinstance(value, Result):
        return {
            "__result__": f"{type(value).__module__}:{type(value).__qualname__}",
            "fields": value._encode_fields(arrays, key + "."),
        }
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        arrays[key] = t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
        return {"__tensor__": key, "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"cannot save object array at {key!r}")
        arrays[key] = value
        return {"__ndarray__": key}
    if isinstance(value, enum.Enum):
        return {"__enum__": f"{type(value).__module__}:{type(value).__qualname__}", "value": value.value}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, arrays, f"{key}.{i}") for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"dictionary keys must be strings to be saved, got {k!r}")
            out[k] = _encode(v, arrays, f"{key}.{k}")
        return out
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, complex):
        return {"__complex__": [value.real, value.imag]}
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and not np.isfinite(value):
            return {"__float__": repr(value)}
        return value
    raise TypeError(f"cannot save a value of type {type(value).__name__} at {key!r}")


# modules whose result types moved: files written before name the old module and still load
MOVED_MODULES = {
    "lanczos_ntk._deflated": "lanczos_ntk.spectral",  # 0.1.0: DeflatedSLQ
    "lanczos_ntk.teacher": "lanczos_ntk.experiments.teacher",  # 0.1.0: the experiment's results
    "lanczos_ntk.cli": "lanczos_ntk.experiments.sweep",  # 0.1.0: SpectralSummary, SweepPoint, ...
    "lanczos_ntk.cli._compute": "lanczos_ntk.experiments.sweep",
}


def _resolve(qualname: str) -> Any:
    module, _, name = qualname.partition(":")
    module = MOVED_MODULES.get(module, module)
    if not module.startswith("lanczos_ntk"):
        raise ValueError(f"refusing to load a type outside lanczos_ntk: {qualname!r}")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _decode(value: Any, arrays: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    if "__result__" in value:
        cls = _resolve(value["__result__"])
        return cls(**{k: _decode(v, arrays) for k, v in value["fields"].items()})
    if "__tensor__" in value:
        return torch.from_numpy(np.array(arrays[value["__tensor__"]])).to(getattr(torch, value["dtype"]))
    if "__ndarray__" in value:
        return np.array(arrays[value["__ndarray__"]])
    if "__enum__" in value:
        return _resolve(value["__enum__"])(value["value"])
    if "__tuple__" in value:
        return tuple(_decode(v, arrays) for v in value["__tuple__"])
    if "__complex__" in value:
        return complex(*value["__complex__"])
    if "__float__" in value:
        return float(value["__float__"])
    return {k: _decode(v, arrays) for k, v in value.items()}


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix in (".json", ".npz"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".json"), path.with_name(path.name + ".npz")


@dataclasses.dataclass(frozen=True)
class Result:
    """Base class of all result objects: frozen, with ``to_dict``, ``save`` and ``load``."""

    def _encode_fields(self, arrays: dict[str, np.ndarray], prefix: str = "") -> dict:
        return {
            f.name: _encode(getattr(self, f.name), arrays, prefix + f.name) for f in dataclasses.fields(self)
        }

    def to_dict(self) -> dict:
        """Plain-Python view: tensors become nested lists, enums their values."""

        def plain(v: Any) -> Any:
            if isinstance(v, Result):
                return v.to_dict()
            if isinstance(v, torch.Tensor):
                return v.detach().cpu().tolist()
            if isinstance(v, np.ndarray):
                return v.tolist()
            if isinstance(v, enum.Enum):
                return v.value
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, (np.floating, np.integer, np.bool_)):
                return v.item()
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<path>.json`` and ``<path>.npz`` atomically; return the JSON path."""
        json_path, npz_path = _paths(path)
        arrays: dict[str, np.ndarray] = {}
        doc = {
            "format": _FORMAT,
            "type": f"{type(self).__module__}:{type(self).__qualname__}",
            "fields": self._encode_fields(arrays),
        }
        import io

        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]  # (numpy's stub: allow_pickle)
        doc["npz_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()  # binds the pair
        atomic_write_bytes(npz_path, buf.getvalue())
        atomic_write_text(json_path, json.dumps(doc, indent=1, allow_nan=False))
        return json_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Result:
        """Read a result written by :meth:`save` (arrays are loaded without pickles)."""
        obj = load_result(path)
        if not isinstance(obj, cls):
            raise TypeError(f"{path} holds a {type(obj).__name__}, expected a {cls.__name__}")
        return obj


def load_result(path: str | os.PathLike) -> Result:
    """Load any saved result, whatever its type.

    Raises :class:`ResultFileError` (naming the file) for a truncated or edited JSON, an array
    file that is not the one saved with it (a SHA-256 of the ``.npz`` is kept in the JSON), or
    one that cannot be read without pickles (never attempted).
    """
    import io

    json_path, npz_path = _paths(path)
    if not json_path.exists():
        raise FileNotFoundError(f"no saved result at {json_path}")
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultFileError(
            f"{json_path} is not a readable result (truncated or not JSON: {exc})"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        fmt = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ResultFileError(f"{json_path} is not a lanczos_ntk result (format {fmt!r})")
    if not npz_path.exists():
        raise ResultFileError(f"{json_path} has no array file beside it ({npz_path.name})")
    raw = npz_path.read_bytes()
    digest = doc.get("npz_sha256")
    if digest is not None and hashlib.sha256(raw).hexdigest() != digest:
        raise ResultFileError(
            f"{npz_path} is not the array file saved with {json_path.name} "
            "(its SHA-256 differs: truncated, replaced or edited)"
        )
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as arrays:
            data = {k: arrays[k] for k in arrays.files}
    except Exception as exc:  # numpy's advice would be to allow pickles: never
        raise ResultFileError(
            f"{npz_path} is not a readable array file ({type(exc).__name__}); "
            "results hold plain arrays only and are never loaded with "
            "pickles"
        ) from None
    try:
        return _decode({"__result__": doc["type"], "fields": doc["fields"]}, data)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ResultFileError(
            f"{json_path} does not describe a valid result ({type(exc).__name__}: {exc})"
        ) from None
