"""Training the student while recording the kernel and the dynamics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from ..._results import Status
from ...channels import (
    critical_direction,
)
from ...dynamics import find_fixed_points
from ...operators import ParamSpec, StateNTK
from ...optim import LowRankNaturalGradient
from ...spectral import deflated_slq, effective_rank, eigsh
from ._detectors import collapse_steps, detect_crossing, spike_onsets
from ._problem import _generator, build_problem
from ._results import Progress, StudentTeacherResult, TeacherConfig


# ------------------------------------------------------------------------------- spectra
def _flat_params(model, names):
    named = dict(model.named_parameters())
    return torch.cat([named[n].detach().reshape(-1) for n in names])


def _load_flat(model, names, theta):
    named = dict(model.named_parameters())
    offset = 0
    with torch.no_grad():
        for n in names:
            p = named[n]
            p.copy_(theta[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def _method(config: TeacherConfig, P: int) -> str:
    if config.spectrum == "auto":
        return "dense" if P <= 256 else "lanczos"
    return config.spectrum


class _Spectrum:
    """Top eigenpairs and effective ranks of ``G`` at the current parameters (warm-started)."""

    def __init__(self, config: TeacherConfig, P: int, generator: torch.Generator):
        self.k = min(int(config.top_k), P)
        self.method = _method(config, P)
        self.tol = float(config.tol)
        self.generator = generator
        self.v0: torch.Tensor | None = None
        self.num_matvecs = 0
        self.probes, self.lanczos_steps = 16, 40

    def __call__(self, G) -> tuple[torch.Tensor, torch.Tensor, float, float, Callable]:

        P = G.shape[0]
        if self.method == "dense":
            eye = torch.eye(P, dtype=G.dtype)
            Gd = G.matmul(eye).to(torch.float64)
            Gd = 0.5 * (Gd + Gd.T)
            lam, V = torch.linalg.eigh(Gd)
            lam, V = lam.flip(0), V.flip(1)
            self.num_matvecs += P
            pos = lam.clamp_min(0.0)
            pr = float(pos.sum() ** 2 / (pos**2).sum())
            p = pos / pos.sum()
            p = p[p > 0]
            ent = float(torch.exp(-(p * p.log()).sum()))
            return lam[: self.k], V[:, : self.k], pr, ent, lambda X: Gd @ X
        res = eigsh(
            G,
            k=self.k,
            which="LA",
            tol=self.tol,
            return_eigenvectors=True,
            v0=self.v0,
            generator=self.generator,
        )
        assert res.eigenvectors is not None  # return_eigenvectors=True
        self.v0 = res.eigenvectors
        # the top eigenpairs just found, exactly, and SLQ on the rest: both ranks from one run
        quad = deflated_slq(
            G,
            self.probes,
            min(self.lanczos_steps, P),
            generator=self.generator,
            tol=self.tol,
            eigenpairs=res,
            side="primal",
        )
        ranks = [effective_rank(quad, kind=kind) for kind in ("participation", "entropy")]
        self.num_matvecs += int(res.num_matvecs) + int(quad.num_matvecs)
        return (
            res.eigenvalues,
            res.eigenvectors,
            float(ranks[0].value),
            float(ranks[1].value),
            lambda X: G.matmul(X.to(G.dtype)).to(torch.float64),
        )


def _critical(student, x, names):
    """``(ĝ basis [P, r], d̂ [P], λ_c, direction)`` at the fixed point ``x`` (zero input)."""
    cd = critical_direction(student, x, params=names)
    g = cd.g.to(torch.float64)
    Q, _ = torch.linalg.qr(g)
    return Q, cd.d[:, 0].to(torch.float64), cd  # d: d Re λ_c / dθ along the branch


def _trivial_point(student, prev: torch.Tensor, seeds: torch.Tensor, generator):
    """Fixed points at zero input, and the index of the one nearest ``prev`` (the trivial branch)."""
    u = torch.zeros(student.input_size, dtype=torch.float64)
    fp = find_fixed_points(student, seeds, u=u, generator=generator, opt_steps=40, newton_steps=8)
    if len(fp) == 0:
        return fp, None
    i = int(torch.argmin(torch.linalg.vector_norm(fp.points - prev, dim=1)))
    return fp, i


# ----------------------------------------------------------------------------- training
def _make_optimizer(config, student, inputs, optimizer, lr, generator):
    if optimizer == "sgd":
        return torch.optim.SGD(student.parameters(), lr=lr)

    return LowRankNaturalGradient(
        student,
        inputs,
        lr=lr,
        rank=config.rank,
        refresh_every=config.refresh_every,
        damping=config.damping if config.damping > 0 else None,
        generator=generator,
    )


def run_student_teacher(
    config: TeacherConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: Progress = None,
) -> StudentTeacherResult:
    """Train the student on the teacher's states and record spectra and dynamics.

    Parameters
    ----------
    config : TeacherConfig
        ``optimizer``, ``lr``, ``num_steps`` and ``record_every`` select the run.
    generator : torch.Generator, optional
        Draws the problem, the eigensolver starts and the fixed-point seeds (default: seeded
        with ``config.seed``).
    progress : callable ``(done, total)``, optional
        Called after every training step.

    Returns
    -------
    StudentTeacherResult

    Notes
    -----
    Cost per record with the dense spectrum: ``P`` products with ``G`` (one block) and an
    ``eigh`` of ``P × P``; with Lanczos: one warm-started :func:`~lanczos_ntk.eigsh` plus SLQ.
    Fixed points are searched from the origin, the previous fixed points, the midpoints of
    pairs of them (where the saddle between two stable states lies) and the final states of
    the student's trials (Sussillo & Barak 2013).
    """
    config = config or TeacherConfig()
    gen = _generator(config, generator)
    prob = build_problem(config, gen)
    student, u, target = prob.student, prob.inputs, prob.targets
    names = tuple(n for n, p in student.named_parameters() if p.requires_grad)
    P = sum(p.numel() for p in student.parameters() if p.requires_grad)
    opt = _make_optimizer(config, student, u, config.optimizer, config.lr, gen)
    spectrum = _Spectrum(config, P, gen)
    n = config.state_size
    S, every = int(config.num_steps), int(config.record_every)

    losses: list[float] = []
    rec: dict[str, list] = {
        k: []
        for k in (
            "steps",
            "eig",
            "pr",
            "ent",
            "lead",
            "fpl",
            "nfp",
            "nst",
            "ccos",
            "dcos",
            "cval",
            "theta",
            "u1",
            "dval",
            "gg",
            "gd",
            "bcos",
            "bpr",
        )
    }
    trivial = torch.zeros(n, dtype=torch.float64)
    known = torch.zeros(0, n, dtype=torch.float64)
    t_train = t_rec = 0.0
    kind = student.kind
    # flat indices of the recurrent and input weights, and of the biases
    named = dict(student.named_parameters())
    spec = ParamSpec(names, tuple(named[k].shape for k in names))
    block, bias = spec.indices(("W", "U")), spec.indices(("b",))
    shares: list[float] = []

    def lead_of(eigs):  # distance to the stability boundary: Re λ (flow), |μ| - 1 (map)
        return eigs.real if kind == "flow" else eigs.abs() - 1.0

    def record(step, states, loss):
        nonlocal trivial, known
        G = StateNTK(student, u).dual()
        lam, V, pr, ent, apply = spectrum(G)
        grads = torch.autograd.grad(
            loss, [dict(student.named_parameters())[k] for k in names], retain_graph=True
        )
        grad = torch.cat([t.reshape(-1) for t in grads]).detach().to(torch.float64)
        grad = grad / torch.linalg.vector_norm(grad).clamp_min(1e-300)
        pairs = torch.combinations(torch.arange(known.shape[0]), 2)
        mids = 0.5 * (known[pairs[:, 0]] + known[pairs[:, 1]]) if len(pairs) else known[:0]
        seeds = torch.cat(
            [trivial[None], torch.zeros(1, n, dtype=torch.float64), known, mids, states[:, -1].detach()]
        )  # midpoints: saddles between two nodes
        fp, i = _trivial_point(student, trivial, seeds, gen)
        rec["steps"].append(step)
        rec["eig"].append(lam.to(torch.float64))
        rec["pr"].append(pr)
        rec["ent"].append(ent)
        rec["nfp"].append(len(fp))
        rec["nst"].append(int(fp.stable.sum()) if len(fp) else 0)
        rec["fpl"].append(lead_of(fp.eigenvalues[:, 0]).clone() if len(fp) else torch.zeros(0))
        rec["theta"].append(_flat_params(student, names))
        u1 = V[:, 0].to(torch.float64)
        rec["u1"].append(u1)
        GB = None
        if spectrum.method == "dense" or block.numel() <= 512:
            E = torch.zeros(len(u1), block.numel(), dtype=torch.float64)
            E[block, torch.arange(block.numel())] = 1.0
            GB = E.T @ apply(E)
            GB = 0.5 * (GB + GB.T)
            lb = torch.linalg.eigvalsh(GB).clamp_min(0.0)
            rec["bpr"].append(float(lb.sum() ** 2 / (lb**2).sum()) if lb.sum() > 0 else math.nan)
        else:
            rec["bpr"].append(math.nan)
        if i is None:
            for k in ("lead", "ccos", "dcos", "cval", "dval", "gg", "gd", "bcos"):
                rec[k].append(float("nan"))
            return
        trivial, known = fp.points[i].detach(), fp.points.detach()
        rec["lead"].append(float(lead_of(fp.eigenvalues[i, 0])))
        try:
            Q, d, _ = _critical(student, trivial, names)
        except ValueError:
            for k in ("ccos", "dcos", "cval", "dval", "gg", "gd", "bcos"):
                rec[k].append(float("nan"))
            return
        dhat = d / torch.linalg.vector_norm(d).clamp_min(1e-300)
        rec["ccos"].append(float(torch.linalg.vector_norm(Q.T @ u1)))
        rec["dcos"].append(float((dhat @ u1).abs()))
        rec["cval"].append(float(torch.linalg.eigvalsh(Q.T @ apply(Q)).max()))
        rec["dval"].append(float(dhat @ apply(dhat[:, None])[:, 0]))
        rec["gg"].append(float(torch.linalg.vector_norm(Q.T @ grad)))
        rec["gd"].append(float((dhat @ grad).abs()))
        if GB is not None:
            ub = torch.linalg.eigh(GB).eigenvectors[:, -1]
            db = d[block]
            rec["bcos"].append(float((db @ ub).abs() / torch.linalg.vector_norm(db).clamp_min(1e-300)))
        else:
            rec["bcos"].append(math.nan)

    for step in range(S + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        states = student(u)
        loss = ((states - target) ** 2).mean()
        losses.append(float(loss.detach()))
        t1 = time.perf_counter()
        if step % every == 0 or step == S:
            record(step, states, loss)
        t2 = time.perf_counter()
        t_rec += t2 - t1
        if step == S:
            break
        before = _flat_params(student, names)
        loss.backward()
        opt.step()
        t_train += (t1 - t0) + (time.perf_counter() - t2)
        delta = _flat_params(student, names) - before
        shares.append(
            float(torch.linalg.vector_norm(delta[bias]) / torch.linalg.vector_norm(delta).clamp_min(1e-300))
        )
        if progress is not None:
            progress(step + 1, S)

    steps = torch.tensor(rec["steps"], dtype=torch.long)
    lead = torch.tensor(rec["lead"], dtype=torch.float64)
    nst = torch.tensor(rec["nst"], dtype=torch.long)
    crossing = detect_crossing(steps, torch.nan_to_num(lead, nan=-math.inf), nst)
    pr = torch.tensor(rec["pr"], dtype=torch.float64)
    collapse = collapse_steps(steps, pr)
    ref = (crossing.index - 1) if crossing.index is not None else len(steps) - 1
    top = crossing.index if crossing.index is not None else len(steps) - 1
    loss_t = torch.tensor(losses, dtype=torch.float64)
    start = int(math.ceil(crossing.step)) if crossing.step is not None else S
    after = loss_t[start:]
    fitted = torch.nonzero(loss_t < 1e-2 * loss_t[0]).reshape(-1)
    after_fit = loss_t[int(fitted[0]) :] if fitted.numel() else loss_t[:0]
    onsets = spike_onsets(loss_t, factor=config.spike_factor, start=start)
    status = Status.CONVERGED if crossing.step is not None else Status.PARTIAL
    message = (
        f"crossing at step {crossing.step:.2f}"
        if crossing.step is not None
        else "the student did not cross the bifurcation; train longer or raise lr"
    )
    k = spectrum.k
    eigs = torch.stack(
        [torch.nn.functional.pad(e, (0, k - e.numel()), value=float("nan")) for e in rec["eig"]]
    )
    num_matvecs = spectrum.num_matvecs + int(getattr(opt, "num_matvecs", 0))
    return StudentTeacherResult(
        config=config,
        optimizer=config.optimizer,
        lr=float(config.lr),
        loss=loss_t,
        steps=steps,
        eigenvalues=eigs,
        participation=pr,
        entropy=torch.tensor(rec["ent"], dtype=torch.float64),
        leading=lead,
        fixed_point_leading=tuple(rec["fpl"]),
        num_fixed_points=torch.tensor(rec["nfp"], dtype=torch.long),
        num_stable=nst,
        channel_cos=torch.tensor(rec["ccos"], dtype=torch.float64),
        sensitivity_cos=torch.tensor(rec["dcos"], dtype=torch.float64),
        channel_eigenvalue=torch.tensor(rec["cval"], dtype=torch.float64),
        crossing=crossing,
        collapse=collapse,
        theta_ref=rec["theta"][max(ref, 0)],
        top_vector_at_crossing=rec["u1"][top],
        param_names=names,
        spikes=len(onsets),
        spike_onsets=tuple(onsets),
        sensitivity_eigenvalue=torch.tensor(rec["dval"], dtype=torch.float64),
        gradient_channel_cos=torch.tensor(rec["gg"], dtype=torch.float64),
        gradient_sensitivity_cos=torch.tensor(rec["gd"], dtype=torch.float64),
        block_sensitivity_cos=torch.tensor(rec["bcos"], dtype=torch.float64),
        block_participation=torch.tensor(rec["bpr"], dtype=torch.float64),
        update_bias_share=torch.tensor(shares, dtype=torch.float64),
        max_loss_after_crossing=float(after.max()) if after.numel() else float("nan"),
        max_loss_after_fit=float(after_fit.max()) if after_fit.numel() else float("nan"),
        final_loss=float(loss_t[-1]),
        spectrum_method=spectrum.method,
        num_matvecs=num_matvecs,
        seconds_train=t_train,
        seconds_record=t_rec,
        seed=int(config.seed),
        status=status,
        message=message,
    )
