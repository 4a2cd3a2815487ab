"""The ``lanczos-ntk`` command group and what its commands share: options, configuration,
model and inputs, the run folder, progress bars, the summary and figures, error handling.

Each command lives in its own module and registers itself on :data:`main`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import click
import torch

from . import _launch
from ._config import defaults_for
from ._runs import (
    ConfigError,
    RunFolder,
    build_model,
    config_digest,
    load_config,
    make_inputs,
    merge_config,
    parse_overrides,
    recorded_config,
)

__all__ = ["CliError", "main"]


class CliError(click.ClickException):
    """A configuration or input problem: one line on stderr, exit code 2, nothing written."""

    exit_code = 2


class LostRankError(click.ClickException):
    """A collective with the other ranks of a launched run failed (a rank died or hangs).

    Shown, the process ends at once: the backend's teardown after a failed collective can
    abort the process (``SIGABRT`` instead of the exit code 1) when it runs.
    """

    exit_code = 1

    def show(self, file=None) -> None:
        super().show(file)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(self.exit_code)


# the commands that share trials over the ranks of a torchrun-launched run; the others have
# no trials to share, and rank 0 runs them alone
SHARDED = ("spectrum", "density", "sweep", "demo")

# this process's launch settings (--backend, --timeout) and, once joined, its Launch
_SESSION: dict = {"backend": None, "timeout": 600.0, "sharded": False, "launch": None}


def _world() -> tuple[int, int]:
    """``(rank, world)`` as ``torchrun`` set them (``(0, 1)`` for a plain process)."""
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def launch_for(cfg: dict) -> _launch.Launch:
    """Return the process's :class:`~._launch.Launch`: under ``torchrun`` the first call joins the
    group (the backend follows ``cfg['device']`` unless ``--backend`` says) and checks that
    every rank runs the same configuration; a single process, or a command without trials to
    share, gets :data:`~._launch.SINGLE`.
    """
    if _SESSION["launch"] is None:
        if not _SESSION["sharded"]:
            _SESSION["launch"] = _launch.SINGLE
        else:
            launch = _launch.launch_from_environment(
                _SESSION["backend"], str(cfg.get("device", "cpu")), _SESSION["timeout"]
            )
            _SESSION["launch"] = launch
            _launch.check_same_configuration(launch, recorded_config(cfg))
    return _SESSION["launch"]


def friendly(fn):
    """Select the Agg backend, apply ``--threads``; turn :class:`ConfigError` into
    :class:`CliError` (exit 2, one line).

    Under ``torchrun`` it also takes ``--backend`` / ``--timeout``, keeps ranks other than 0
    quiet, lets rank 0 run a command without trials alone, turns a failed collective into one
    line (exit 1) and leaves the group at the end.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib

        matplotlib.use("Agg", force=True)  # figures are written to files, never shown
        threads = kwargs.pop("threads", None)
        name = fn.__name__.removesuffix("_command")
        _SESSION.update(
            backend=kwargs.pop("backend", None),
            timeout=kwargs.pop("timeout", 600.0),
            sharded=name in SHARDED,
            launch=None,
        )
        rank, world = _world()
        if world > 1 and not _SESSION["sharded"] and rank != 0:
            return None  # nothing to share: rank 0 runs it alone
        if world > 1 and rank != 0 and "quiet" in kwargs:
            kwargs["quiet"] = True
        if threads is None and name == "demo":
            threads = 1
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            out = fn(*args, **kwargs)
            _leave_group(success=True)
            return out
        except ConfigError as exc:
            _leave_group(success=False)
            raise CliError(str(exc)) from None
        except (RuntimeError, torch.distributed.DistError) as exc:
            launch = _SESSION["launch"]
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            # only a failed collective (the backend's error) is a lost rank; other errors are
            # the program's and keep their traceback
            collective = (
                isinstance(exc, torch.distributed.DistError)
                or text.startswith("[")
                and ("gloo" in text or "nccl" in text.lower())
            )
            if launch is None or not launch.distributed or not collective:
                raise
            _leave_group(success=False)
            first = re.sub(r"^\[[^\]]*\]\s*", "", text)  # without the backend's source location
            raise LostRankError(
                f"rank {launch.rank}: a collective with the other ranks failed ({first[:160]}); "
                f"a rank stopped or hangs. Rank 0 wrote only finished results: run the same "
                f"torchrun command again to resume"
            ) from None
        finally:
            torch.set_num_threads(before)

    return wrapper


def _leave_group(success: bool) -> None:
    """Leave the process group this command joined (after a barrier when all went well)."""
    launch = _SESSION["launch"]
    _SESSION["launch"] = None
    if launch is None or not launch.distributed or not torch.distributed.is_initialized():
        return
    if success:
        torch.distributed.barrier(group=launch.group)
    torch.distributed.destroy_process_group()


def experiment_options(default_out: str, set_example: str):
    """Options of the experiment commands (``teacher``, ``track``): ``--out``, ``--config`` (a
    ``TeacherConfig`` TOML), ``--set``, ``--fresh``, ``--quiet`` and ``--threads`` (1 by
    default: their problems are small).
    """
    options = [
        click.option(
            "--out",
            type=click.Path(file_okay=False),
            default=default_out,
            show_default=True,
            help="Run folder (results/, figures/, summary.json); re-running resumes.",
        ),
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            help="TOML file with TeacherConfig keys (see experiments/teacher.toml).",
        ),
        click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="KEY=VALUE",
            help=f"Override a configuration key, e.g. --set {set_example} (repeatable).",
        ),
        click.option("--fresh", is_flag=True, help="Discard what the run folder holds and start over."),
        click.option("--quiet", is_flag=True, help="No progress bar and no summary on the terminal."),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Torch CPU threads (the problem is small: more threads mostly add overhead).",
        ),
    ]

    def wrap(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return wrap


def common_options(fn):
    """Options shared by every command."""
    options = [
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            help="TOML configuration file (see experiments/).",
        ),
        click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="KEY=VALUE",
            help="Override a configuration key, e.g. --set model.gain=1.5 (repeatable).",
        ),
        click.option("--seed", type=int, help="Seed of inputs, probes and fixed-point seeds."),
        click.option("--device", help="Torch device of the model (cpu, cuda, cuda:1, ...)."),
        click.option(
            "--dtype",
            type=click.Choice(["float64", "float32"]),
            help="Precision of the model and its products (float64 by default).",
        ),
        click.option(
            "--model",
            "model_spec",
            metavar="SPEC",
            help="Built-in model (ctrnn, rnn, gru, ssm, normal_form) or a factory "
            "package.module:factory or path/to/file.py:factory.",
        ),
        click.option(
            "--out",
            type=click.Path(file_okay=False),
            help="Run folder (default runs/<command>-<config hash>); re-running with the "
            "same folder resumes.",
        ),
        click.option("--fresh", is_flag=True, help="Discard what the run folder holds and start over."),
        click.option("--quiet", is_flag=True, help="No progress bars and no summary on the terminal."),
        click.option(
            "--threads",
            type=click.IntRange(min=0),
            default=None,
            help="CPU threads of torch (0: torch's default; the demo uses 1, which is "
            "fastest for small problems on a shared machine).",
        ),
        click.option(
            "--backend",
            type=click.Choice(["gloo", "nccl"]),
            default=None,
            help="Under torchrun: the process group's backend (default gloo on the "
            "CPU, nccl on CUDA devices).",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=600.0,
            show_default=True,
            help="Under torchrun: seconds a rank waits for the others in a collective "
            "before it stops with an error (a rank died or hangs).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def inputs_option(fn):
    return click.option(
        "--inputs",
        "inputs_file",
        type=click.Path(dir_okay=False),
        help="Inputs [trials, steps, d_in]: a .pt tensor (loaded with "
        "weights_only=True) or an .npz with one array or a key 'inputs'.",
    )(fn)


def resolve_config(command: str, config_file, overrides, **explicit) -> dict:
    """Defaults < TOML file < --set < explicit options; unknown keys are errors."""
    layers = []
    if config_file:
        layers.append(load_config(config_file))
    layers.append(parse_overrides(overrides))
    top = {}
    for key in ("seed", "device", "dtype"):
        if explicit.get(key) is not None:
            top[key] = explicit[key]
    if explicit.get("model_spec"):
        top["model"] = {"name": explicit["model_spec"]}
    if explicit.get("inputs_file"):
        top["inputs"] = {"file": explicit["inputs_file"]}
    if explicit.get("checkpoints"):
        top["sweep"] = {"checkpoints": list(explicit["checkpoints"]), "param": "checkpoints"}
    layers.append(top)
    return merge_config(defaults_for(command), *[_renamed(layer) for layer in layers])


def _renamed(layer: dict) -> dict:
    """Old configuration key names mapped to the current ones (with a one-line note)."""
    from ._config import RENAMED

    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in layer.items()}
    for (table, old), new in RENAMED.items():
        if isinstance(out.get(table), dict) and old in out[table]:
            if new in out[table]:
                raise ConfigError(
                    f"{table}.{old} and {table}.{new} are the same key "
                    f"(the first is its old name); give only {table}.{new}"
                )
            out[table][new] = out[table].pop(old)
            click.echo(
                f"note: {table}.{old} is now called {table}.{new} (the library's "
                f"argument name); the old name is still read",
                err=True,
            )
    return out


def torch_settings(cfg: dict) -> tuple[torch.dtype, str]:
    dtype = {"float64": torch.float64, "float32": torch.float32}.get(cfg["dtype"])
    if dtype is None:
        raise ConfigError(f"dtype must be float64 or float32, got {cfg['dtype']!r}")
    try:
        device = torch.device(cfg["device"])
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {cfg['device']!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg['device']!r} requested but CUDA is not available")
    return dtype, str(device)


def model_and_inputs(cfg: dict) -> tuple[torch.nn.Module, torch.Tensor | None]:
    """Build the model and its inputs from the config and check they fit (before any writing)."""
    dtype, device = torch_settings(cfg)
    launch = launch_for(cfg)
    model = build_model(cfg["model"], dtype=dtype, device=device)
    if "inputs" not in cfg:
        return model, None
    d_in = getattr(model, "input_size", None)
    if d_in is None and not cfg["inputs"]["file"]:
        raise ConfigError("the model has no attribute input_size: give the inputs with --inputs FILE")
    # under torchrun each rank reads (or draws) only its own share of the trials
    inputs = make_inputs(
        cfg["inputs"],
        None if d_in is None else int(d_in),
        dtype=dtype,
        seed=cfg["seed"],
        share=launch.share if launch.distributed else None,
    )
    try:
        with torch.no_grad():
            out = model(inputs[:1].to(device))
    except Exception as exc:
        expected = _first_layer_inputs(model)
        hint = (
            f"; its first layer takes {expected} input features, the inputs have "
            f"{inputs.shape[-1]} (set inputs.* or give --inputs FILE)"
            if expected is not None and expected != inputs.shape[-1]
            else ""
        )
        raise ConfigError(
            f"the model rejects inputs of shape {list(inputs.shape)}: {type(exc).__name__}: {exc}{hint}"
        ) from None
    out = out[0] if isinstance(out, tuple) else out
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise ConfigError(
            "the model must map inputs [trials, steps, d_in] to states "
            f"[trials, steps, n]; got {type(out).__name__} "
            f"{list(out.shape) if isinstance(out, torch.Tensor) else ''}"
        )
    return model, inputs


def _first_layer_inputs(model) -> int | None:
    """Input features the model's first linear or recurrent layer expects, if it has one."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            return int(m.in_features)
        if isinstance(m, torch.nn.RNNBase):
            return int(m.input_size)
    return None


@contextlib.contextmanager
def run_folder(command: str, cfg: dict, out, fresh: bool, quiet: bool = False):
    """Open the run folder; warnings raised inside go to its log (and a count to stderr)."""
    launch = launch_for(cfg)
    cfg = recorded_config(cfg)  # what the run depends on: the model's unused keys left out
    path = Path(out) if out else Path("runs") / f"{command}-{config_digest(cfg)}"
    problem: str | None = None
    folder: RunFolder | _launch.FollowerFolder | None = None
    if launch.leader:
        try:  # a clear one-line error for a place that cannot hold the run, before anything else
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
            folder = (
                _launch.LeaderFolder(path, cfg, fresh=fresh, command=command, launch=launch)
                if launch.distributed
                else RunFolder(path, cfg, fresh=fresh, command=command)
            )
        except OSError as exc:
            problem = f"cannot write the run folder {path}: {exc.strerror or exc}"
        except ConfigError as exc:
            problem = str(exc)
    problem = launch.broadcast(problem)  # the other ranks stop with rank 0's message
    if problem is not None:
        raise ConfigError(problem)
    if folder is None:
        folder = _launch.FollowerFolder(path, launch)
    with folder, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", DeprecationWarning)  # library internals, not the run's
        try:
            yield folder
        except KeyboardInterrupt:
            folder.log("interrupted (Ctrl-C); what finished is saved here")
            click.echo(
                f"interrupted: what finished is saved in {folder.path}; run the same "
                f"command with --out {folder.path} to resume",
                err=True,
            )
            raise SystemExit(130) from None
        finally:
            counts: dict = {}
            for w in caught:
                key = f"{w.category.__name__}: {w.message}"
                counts[key] = counts.get(key, 0) + 1
            for key, n in counts.items():
                folder.log(f"warning ({n}x) {key}")
            if counts and not quiet:
                click.echo(
                    f"{sum(counts.values())} warning(s) during the run; see {folder.path / 'run.log'}",
                    err=True,
                )


def progress(quiet: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=quiet, file=sys.stderr, leave=False, dynamic_ncols=True, **kw)


# what the summaries' spectral numbers mean, printed under them
RANK_LEGEND = (
    "legend: participation rank (Σλ)²/Σλ² and entropy rank exp(−Σ p log p), "
    "p = λ/Σλ, count the eigenvalues that carry the spectrum (1: collapsed onto one "
    "direction; the dimension: flat)"
)
ZERO_MASS_LEGEND = (
    "legend: zero mass = fraction of the M eigenvalues of K that are zero to "
    "rounding (M minus the rank of J, over M)"
)


def report(quiet: bool, lines, folder: RunFolder) -> None:
    """The command's summary on stdout; with ``--quiet`` only the run folder's path."""
    launch = _SESSION["launch"]
    if (launch.rank if launch is not None else _world()[0]) != 0:
        return  # under torchrun rank 0 alone reports
    if quiet:
        click.echo(str(folder.path))
        return
    for line in lines:
        click.echo(line)


def save_figures(folder: RunFolder, figs: dict) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    for name, fig in figs.items():
        paths += folder.save_figure(fig, name)
        plt.close(fig)
    return paths


def make_operator(model, inputs, cfg):
    from .. import StateNTK

    outputs = cfg["spectrum"]["outputs"]
    if outputs not in ("states", "readout"):
        raise ConfigError(f"spectrum.outputs must be 'states' or 'readout', got {outputs!r}")
    try:
        K = StateNTK(model, inputs, outputs=outputs, process_group=launch_for(cfg).group)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build the sNTK of this model and inputs: {exc}") from None
    M, P = K.total_states, K.dual().shape[0]  # M over all ranks of a launched run
    rank = min(M, P)  # at most this many nonzero eigenvalues
    for key in ("k", "bottom"):
        if int(cfg["spectrum"].get(key, 0)) > rank:
            raise ConfigError(
                f"spectrum.{key}={cfg['spectrum'][key]} exceeds the number of "
                f"nonzero eigenvalues the sNTK can have, min(M, P) = "
                f"min({M}, {P}) = {rank}"
            )
    return K


def check_spectrum_cfg(cfg: dict) -> None:
    s = cfg["spectrum"]
    for key in ("k", "num_probes", "num_steps"):
        if s[key] < 1:
            raise ConfigError(f"spectrum.{key} must be >= 1, got {s[key]}")
    if s["bottom"] < 0 or not s["tol"] > 0:
        raise ConfigError("spectrum.bottom must be >= 0 and spectrum.tol > 0")
    if cfg["density"]["scale"] not in ("linear", "log"):
        raise ConfigError(f"density.scale must be 'linear' or 'log', got {cfg['density']['scale']!r}")
    if cfg["density"]["num_points"] < 2 or cfg["density"]["sigma"] < 0:
        raise ConfigError("density.points must be >= 2 and density.sigma >= 0 (0: automatic)")


# ----------------------------------------------------------------------------- the group
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lanczos_ntk")
def main():
    """Spectra of the state-space NTK of recurrent models, and how they collapse at bifurcations.

    Every command reads an optional TOML file (--config, examples in experiments/), applies
    --set KEY=VALUE overrides, writes a run folder (config, results as JSON + NPZ, figures as
    PNG + PDF, run.log) and resumes an interrupted run in the same folder.
    """
