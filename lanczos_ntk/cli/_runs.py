"""Run folders, configuration files and safe loading of users' models and data (CLI support).

A *run folder* holds the resolved configuration (``config.toml`` and ``config.json``), one
result file pair per finished unit of work (``results/<name>.json`` + ``.npz``, written through
a temporary name and a rename), the figures (``figures/<name>.png`` and ``.pdf``) and a log
file ``run.log``. Re-running a command with the same folder and configuration skips the units
already saved; a different configuration is refused unless the folder is started afresh.

Nothing here prints; errors in user input are raised as :class:`ConfigError` (a
``ValueError``) with one line naming the problem, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._results import Result, ResultFileError, atomic_write_bytes, atomic_write_text, load_result

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "ConfigError",
    "RunFolder",
    "build_model",
    "dump_toml",
    "load_config",
    "load_factory",
    "load_inputs",
    "load_state_dict",
    "make_inputs",
    "merge_config",
    "parse_overrides",
]

_FREE_TABLES = ("kwargs",)  # tables whose keys are not checked (passed to a user's factory)


class ConfigError(ValueError):
    """A problem with the user's configuration, files or command line (one-line message)."""


# ------------------------------------------------------------------------------------ TOML
def load_config(path: str | Path) -> dict:
    """Read a TOML configuration file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from None


def _parse_value(text: str) -> Any:
    """A TOML value (``1``, ``1.5``, ``true``, ``[1, 2]``, ``"x"``) or, failing that, a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict:
    """Turn ``("model.gain=1.5", "seed=3")`` into a nested dictionary."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"expected --set KEY=VALUE (e.g. model.gain=1.5), got {item!r}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is both a value and a table")
        node[parts[-1]] = _parse_value(value.strip())
    return out


def _check_type(key: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    return value


def parse_list(text: str, what: str, cast=float) -> list:
    """``"a,b,c"`` of a command-line option ``--what`` as a list of ``cast`` values; a
    :class:`ConfigError` naming the option for anything else, or for an empty list.
    """
    kind = {int: "whole numbers", float: "numbers"}.get(cast, "values")
    try:
        vals = [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what}: expected comma-separated {kind}, got {text!r}") from None
    if not vals:
        raise ConfigError(f"--{what}: expected at least one value, got {text!r}")
    return vals


def merge_config(defaults: Mapping, *layers: Mapping, where: str = "") -> dict:
    """Overlay ``layers`` on ``defaults``; unknown keys and wrong types raise :class:`ConfigError`."""
    out = copy.deepcopy(dict(defaults))
    for layer in layers:
        for key, value in layer.items():
            full = f"{where}{key}"
            if key not in out:
                known = ", ".join(sorted(out))
                raise ConfigError(f"unknown configuration key {full!r} (known here: {known})")
            default = out[key]
            if isinstance(default, dict):
                if not isinstance(value, dict):
                    raise ConfigError(f"{full}: expected a table, got {value!r}")
                if key in _FREE_TABLES:
                    out[key] = {**default, **copy.deepcopy(value)}
                else:
                    out[key] = merge_config(default, value, where=full + ".")
            else:
                out[key] = _check_type(full, default, value)
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(cfg: Mapping, _prefix: str = "") -> str:
    """Write a nested dictionary of scalars, lists and tables as TOML (inverse of ``tomllib``)."""
    lines, tables = [], []
    for k, v in cfg.items():
        if isinstance(v, dict) and not (_prefix and k in _FREE_TABLES and not v):
            tables.append((k, v))
        else:
            lines.append(f"{json.dumps(k) if not k.isidentifier() else k} = {_toml_value(v)}")
    text = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{_prefix}{k}"
        text += f"\n[{name}]\n" + dump_toml(v, name + ".")
    return text


def config_digest(cfg: Mapping) -> str:
    """Short stable hash of a configuration (names default run folders)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


# ------------------------------------------------------------------------------ run folder
class RunFolder:
    """A run's output folder: config, per-unit results, figures and a log.

    Create it only after the configuration has been validated: construction writes to disk.

    Parameters
    ----------
    path : folder
    config : dict
        The resolved configuration; compared with the one stored in an existing folder.
    fresh : bool
        Remove an existing run folder's content and start over.
    command : str
        Name of the command (stored in the log).
    """

    def __init__(self, path: str | Path, config: Mapping, *, fresh: bool = False, command: str = ""):
        self.path = Path(path)
        self.config = dict(config)
        self._checked: dict[str, Result] = {}  # results has() read back, for load()
        self.resumed = False
        stored = self.path / "config.json"
        if self.path.exists():
            if not self.path.is_dir():
                raise ConfigError(f"--out {self.path} exists and is not a folder")
            if stored.exists():
                if fresh:
                    self._clear()
                else:
                    old = json.loads(stored.read_text(encoding="utf-8"))
                    if old != json.loads(json.dumps(self.config)):
                        diff = _first_difference(old, self.config)
                        raise ConfigError(
                            f"{self.path} holds a run with a different configuration "
                            f"({diff}); pass --fresh to start over or choose another --out"
                        )
                    self.resumed = True
            elif any(self.path.iterdir()):
                raise ConfigError(f"--out {self.path} is a non-empty folder that is not a run folder")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "results").mkdir(exist_ok=True)
        (self.path / "figures").mkdir(exist_ok=True)
        if not self.resumed:
            atomic_write_text(self.path / "config.toml", dump_toml(self.config))
            atomic_write_text(stored, json.dumps(self.config, indent=1, sort_keys=True))
        self.logger = logging.getLogger(f"lanczos_ntk.run.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        self._handler = logging.FileHandler(self.path / "run.log", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        self.logger.addHandler(self._handler)
        self.log(f"{command or 'run'}: {'resumed' if self.resumed else 'started'} in {self.path}")

    def _clear(self) -> None:
        for name in ("results", "figures"):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in ("config.toml", "config.json", "run.log", "summary.json"):
            (self.path / name).unlink(missing_ok=True)

    def close(self) -> None:
        """Detach the log file."""
        self.logger.removeHandler(self._handler)
        self._handler.close()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log(self, message: str) -> None:
        """Append a line to ``run.log``."""
        self.logger.info(message)

    # results ----------------------------------------------------------------------------
    def result_path(self, name: str) -> Path:
        return self.path / "results" / name

    def has(self, name: str) -> bool:
        """Whether the result ``name`` was saved completely and reads back. An unreadable one
        (a truncated or edited file) is logged and set aside as ``<name>.bad-*``, so the caller
        computes it again.
        """
        p = self.result_path(name)
        json_path, npz_path = p.with_name(name + ".json"), p.with_name(name + ".npz")
        if not (json_path.exists() and npz_path.exists()):
            return False
        try:
            self._checked[name] = load_result(p)  # read once: load() hands it over
        except ResultFileError as exc:
            self.log(f"{name}: unreadable ({exc}); set aside and recomputed")
            for f in (json_path, npz_path):
                f.replace(f.with_name(f"{f.name}.bad-{int(time.time())}"))
            return False
        return True

    def save(self, name: str, result: Result) -> Path:
        """Save a result object atomically under ``results/<name>``."""
        return result.save(self.result_path(name))

    def load(self, name: str) -> Result:
        checked = self._checked.pop(name, None)
        return checked if checked is not None else load_result(self.result_path(name))

    def cached(self, name: str, compute, message: str) -> Result:
        """The saved result ``name`` if an earlier run finished it, else ``compute()`` (logged
        with ``message``), saved atomically before it is returned: the unit of resuming.
        """
        if self.has(name):
            return self.load(name)
        self.log(message)
        result = compute()
        self.save(name, result)
        return result

    def write_json(self, name: str, data: Any) -> Path:
        """Write plain data as JSON atomically (non-finite numbers become ``null``)."""
        path = self.path / name
        atomic_write_text(path, json.dumps(_finite(data), indent=1, allow_nan=False, default=_jsonable))
        return path

    def save_figure(self, fig, name: str) -> list[Path]:
        """Write ``figures/<name>.png`` and ``.pdf`` atomically; return their paths."""
        paths = []
        for ext, kw in (("png", {"dpi": 130}), ("pdf", {})):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, bbox_inches="tight", **kw)
            path = self.path / "figures" / f"{name}.{ext}"
            atomic_write_bytes(path, buf.getvalue())
            paths.append(path)
        return paths


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return _finite(_jsonable(v))
    return v


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if isinstance(v, complex):
        return [v.real, v.imag]
    return str(v)


def _first_difference(old: Any, new: Any, key: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if k not in old or k not in new:
                return f"key {key + k!r} added or removed"
            if json.dumps(old[k], sort_keys=True) != json.dumps(new[k], sort_keys=True):
                return _first_difference(old[k], new[k], key + k + ".")
    return f"{key.rstrip('.')}: {old!r} -> {new!r}"


# ------------------------------------------------------------------ users' models and data
def load_factory(spec: str):
    """Resolve ``package.module:factory`` or ``path/to/file.py:factory`` to a callable."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ConfigError(f"--model {spec!r}: expected 'package.module:factory' or 'path/to/file.py:factory'")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"--model {spec!r}: file {path} not found")
            mod_name = f"_lanczos_ntk_user_{config_digest({'p': str(path.resolve())})}"
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            # a ``.py`` file always gets a spec with a source loader
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)
        else:
            # like `python -m`: modules in the working directory are importable
            cwd = str(Path.cwd())
            added = cwd not in sys.path
            if added:
                sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(target)
            finally:
                if added:
                    sys.path.remove(cwd)
    except ConfigError:
        raise
    except Exception as exc:  # import errors of any kind in the user's module
        hint = (
            "; or give the file itself, e.g. --model path/to/models.py:build"
            if isinstance(exc, ImportError)
            else ""
        )
        raise ConfigError(
            f"--model {spec!r}: cannot import {target}: {type(exc).__name__}: {exc}{hint}"
        ) from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"--model {spec!r}: {target} has no callable {name!r}")
    return factory


_MODEL_KEYS = {
    "ctrnn": ("state_size", "input_size", "gain", "dt", "input_scale", "readout_size", "seed"),
    "rnn": ("state_size", "input_size", "gain", "input_scale", "readout_size", "seed"),
    "gru": ("state_size", "input_size", "gain", "readout_size", "seed"),
    "ssm": ("state_size", "input_size", "seed"),
    "normal_form": ("input_size", "form", "kind", "mu"),
}


def model_keys(cfg: Mapping) -> tuple[str, ...]:
    """The ``[model]`` keys that :func:`build_model` reads for this model (``name`` first)."""
    name = cfg["name"]
    if ":" in name:
        return ("name", "seed", "kwargs")
    keys = _MODEL_KEYS.get(name)
    if keys is None:
        return tuple(cfg)  # unknown: build_model says so; record everything
    if name == "normal_form" and cfg.get("kind") == "flow":
        keys = (*keys, "dt")
    return ("name", *keys)


def recorded_config(cfg: Mapping) -> dict:
    """The configuration as a run folder records it: the ``[model]`` table keeps only the keys
    its model uses (a CTRNN's run does not carry the normal forms' ``form`` and ``mu``).
    """
    out = dict(cfg)
    if isinstance(cfg.get("model"), Mapping) and "name" in cfg["model"]:
        out["model"] = {k: cfg["model"][k] for k in model_keys(cfg["model"]) if k in cfg["model"]}
    return out


def build_model(cfg: Mapping, *, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    """Build the model described by a ``[model]`` table (a built-in name or a factory spec)."""
    from .. import models

    name = cfg["name"]
    n, d = int(cfg["state_size"]), int(cfg["input_size"])
    if n < 1 or d < 0:
        raise ConfigError(f"model.state_size must be >= 1 and model.input_size >= 0, got {n} and {d}")
    if ":" in name:
        factory = load_factory(name)
        try:  # a factory drawing from the global RNG gets the seed model.seed, without leaking it
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(cfg.get("seed", 0)))
                model = factory(**cfg.get("kwargs", {}))
        except Exception as exc:
            raise ConfigError(f"--model {name!r}: the factory raised {type(exc).__name__}: {exc}") from None
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"--model {name!r}: the factory returned a {type(model).__name__}, expected a torch.nn.Module"
            )
        return model.to(device=device, dtype=dtype)
    seed = int(cfg.get("seed", 0))
    readout = int(cfg.get("readout_size", 0)) or None
    try:
        if name == "ctrnn":
            model = models.CTRNN(
                n,
                d,
                gain=cfg["gain"],
                dt=cfg["dt"],
                seed=seed,
                input_scale=cfg["input_scale"],
                readout_size=readout,
            )
        elif name == "rnn":
            model = models.DiscreteRNN(
                n, d, gain=cfg["gain"], seed=seed, input_scale=cfg["input_scale"], readout_size=readout
            )
        elif name == "gru":
            model = models.GRU(n, d, gain=cfg["gain"], seed=seed, readout_size=readout)
        elif name == "ssm":
            model = models.DiagonalSSM(n, d, seed=seed)
        elif name == "normal_form":
            if cfg["kind"] == "flow":
                model = models.ContinuousNormalForm(
                    cfg["form"], mu=cfg["mu"], input_size=max(d, 1), dt=cfg["dt"]
                )
            elif cfg["kind"] == "map":
                model = models.DiscreteNormalForm(cfg["form"], mu=cfg["mu"], input_size=max(d, 1))
            else:
                raise ConfigError(f"model.kind must be 'flow' or 'map', got {cfg['kind']!r}")
        else:
            raise ConfigError(
                f"unknown model.name {name!r}; expected ctrnn, rnn, gru, ssm, normal_form "
                "or a factory 'package.module:factory'"
            )
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build model {name!r}: {exc}") from None
    return model.to(device=device, dtype=dtype)


def _single_array(obj: Any, path: Path) -> Any:
    if isinstance(obj, Mapping):
        if "inputs" in obj:
            return obj["inputs"]
        if len(obj) == 1:
            return next(iter(obj.values()))
        raise ConfigError(
            f"{path} holds {len(obj)} arrays ({', '.join(map(str, obj))}); save one array or name it 'inputs'"
        )
    return obj


def load_inputs(path: str | Path, input_size: int | None, *, dtype: torch.dtype, share=None) -> torch.Tensor:
    """Load inputs ``[B, T, d_in]`` from ``.pt`` (no pickles) or ``.npz`` / ``.npy`` (no pickles).

    ``share(B) -> (lo, hi)``: keep only trials ``lo:hi``. A ``.npy`` file is memory-mapped and a
    ``.pt`` file loaded with ``mmap=True``, so only those trials are read into memory (an
    ``.npz`` member is read whole, then sliced).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"inputs file not found: {path}")
    if path.suffix not in (".pt", ".pth", ".npz", ".npy"):
        kind = path.suffix or "suffix-less"
        raise ConfigError(
            f"{path}: expected inputs [trials, steps, d_in] in a .pt / .pth "
            f"(torch.save of a tensor), .npy or .npz file, got a {kind} file"
        )
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                u = _single_array({k: data[k] for k in data.files}, path)
        elif path.suffix == ".npy":
            u = np.load(path, allow_pickle=False, mmap_mode="r")
        else:
            u = _single_array(torch.load(path, map_location="cpu", weights_only=True, mmap=True), path)
        if isinstance(u, np.ndarray):
            if u.dtype.kind not in "fiu":
                raise ConfigError(f"{path}: expected numeric inputs, got dtype {u.dtype}")
            u = torch.from_numpy(np.array(_trials(u, share)))
        elif isinstance(u, torch.Tensor):
            u = _trials(u, share).clone()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"cannot read inputs from {path} (expected a tensor saved with "
            f"torch.save, or numpy .npy/.npz; no pickles): {type(exc).__name__}: "
            f"{exc}"
        ) from None
    if not isinstance(u, torch.Tensor):
        raise ConfigError(f"{path}: expected a tensor of inputs, found a {type(u).__name__}")
    if not (u.is_floating_point() or u.dtype in (torch.int32, torch.int64)):
        raise ConfigError(f"{path}: expected numeric inputs, got dtype {u.dtype}")
    if u.dim() != 3 or (input_size is not None and u.shape[-1] != input_size) or 0 in u.shape:
        d = "d_in" if input_size is None else input_size
        raise ConfigError(
            f"{path}: expected inputs of shape [trials, steps, {d}] "
            f"(model input_size {d}), got {list(u.shape)}"
        )
    return u.to(dtype)


def _trials(u, share):
    """``u[lo:hi]`` for this rank's ``share`` of the trials (all of them without one)."""
    if share is None or getattr(u, "ndim", 0) != 3:
        return u
    lo, hi = share(int(u.shape[0]))
    return u[lo:hi]


# generated inputs are drawn in blocks of this many trials, block j from its own seed (block 0
# from the run's seed itself), so that the dataset is the same however many ranks share it
INPUT_BLOCK = 256


def _block_seed(seed: int, block: int) -> int:
    if block == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) % 2**32, block]).generate_state(1, np.uint64)[0] % 2**63)


def make_inputs(
    cfg: Mapping, input_size: int | None, *, dtype: torch.dtype, seed: int, share=None
) -> torch.Tensor:
    """Inputs from an ``[inputs]`` table: a file, or ``trials × steps`` of a built-in signal.

    Signals (``kind``): ``"noise"`` (Gaussian, std ``amplitude``), ``"constant"``
    (``amplitude`` everywhere), ``"zeros"``, ``"sine"`` (``amplitude · sin(2πt/steps + phase)``,
    one random phase per trial and input). Random signals are drawn in blocks of
    ``INPUT_BLOCK`` trials, each from its own seed, so ``share(B) -> (lo, hi)`` (a rank's
    trials) draws only the blocks it needs and gets exactly those trials of the whole dataset.
    """
    if cfg["file"]:
        return load_inputs(cfg["file"], input_size, dtype=dtype, share=share)
    if input_size is None:
        raise ConfigError("the model's input size is unknown: give the inputs with --inputs FILE")
    B, T, amp = int(cfg["trials"]), int(cfg["steps"]), float(cfg["amplitude"])
    if B < 1 or T < 1:
        raise ConfigError(f"inputs.trials and inputs.steps must be >= 1, got {B} and {T}")
    kind = cfg["kind"]
    if kind not in ("noise", "constant", "zeros", "sine"):
        raise ConfigError(f"unknown inputs.kind {kind!r}; expected noise, constant, zeros or sine")
    lo, hi = (0, B) if share is None else share(B)
    blocks = []
    for j in range(lo // INPUT_BLOCK, (hi - 1) // INPUT_BLOCK + 1):
        b0, b1 = j * INPUT_BLOCK, min(B, (j + 1) * INPUT_BLOCK)
        g = torch.Generator().manual_seed(_block_seed(seed, j))
        shape = (b1 - b0, T, input_size)
        if kind == "noise":
            u = amp * torch.randn(shape, generator=g, dtype=torch.float64)
        elif kind == "constant":
            u = torch.full(shape, amp, dtype=torch.float64)
        elif kind == "zeros":
            u = torch.zeros(shape, dtype=torch.float64)
        else:
            phase = 2 * math.pi * torch.rand(b1 - b0, 1, input_size, generator=g, dtype=torch.float64)
            t = torch.arange(T, dtype=torch.float64).reshape(1, T, 1)
            u = amp * torch.sin(2 * math.pi * t / T + phase)
        blocks.append(u[max(lo, b0) - b0 : min(hi, b1) - b0])
    return torch.cat(blocks).to(dtype)


def load_state_dict(path: str | Path, model: torch.nn.Module) -> dict:
    """Load a checkpoint saved with ``torch.save(model.state_dict())`` (no pickles) and check it fits."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: expected a state dict (name -> tensor)")
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ConfigError(
            f"{path}: checkpoint does not fit the model (missing {missing}, unexpected {extra})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ConfigError(
                f"{path}: {k} has shape {list(v.shape)}, the model expects {list(own[k].shape)}"
            )
    return dict(state)
