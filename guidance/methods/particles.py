"""Particle search: sequential Monte Carlo over the flow's SDE, steered by a reward that needs no gradient.

Feynman-Kac steering (Singhal et al., "A General Framework for Inference-time Scaling and Steering of Diffusion
Models", 2025, official code: zacharyhorvitz/Fk-Diffusion-Steering, ``discrete_diffusion/fkd_class.py``) carried to
rectified flows with the stochastic sampler of :mod:`guidance.sde` (as Kim et al., "Inference-Time Scaling for Flow
Models via Stochastic Generation and Rollover Budget Forcing", 2025, do). K particles per output follow the SDE; at
the resampling steps each is scored on its clean estimate, r = -L(x0_hat), its log-weight grows by λ G (λ =
``temperature``, G the potential), and the K are resampled by their weights::

    x^1..x^K ~ N(0, I);  W = 0;  A = 0;  r_prev = 0;  m = -inf;  S = 0        per output, K particles
    for i in 0 .. N-1:
        v = v_theta(x, s_i);  x0_hat = x - s_i v                       one batched call for all B·K particles
        [x = x - step_size ∇_{x0_hat} L(x0_hat)]                      optional FlowChef step (step_size > 0)
        if i in (start, start + every, ... < stop):                    a resampling step (default start = every,
            r = -L(x0_hat);  m = max(m, r);  S = S + r                   stop = N - 1)
            G = r - r_prev ("difference") | m ("max") | S ("add") | r ("immediate")
            W = W + λ G;  A = A + G;  r_prev = r
            if ESS(W) < ess_threshold · K  (always without ess_threshold):
                a ~ Resample(softmax W)  (systematic or multinomial)
                x, r_prev, m, S, A = x[a], r_prev[a], m[a], S[a], A[a];  W = 0
        x = sde_step(x, v, s_i, s_{i+1}, η)                            deterministic on the last step
    r = -L(x_0);  log w = W + λ (r - A)
    keep argmax_k r^k ("best"), one particle drawn with w ("sample") or all K with w ("all")

The final weight. Each resampling step multiplies the particles' target by exp(λ G): after the last one they are
a weighted sample (weights W) of the path measure p(path) exp(λ A(path)), A the sum of the potentials along the
particle's ancestry. The factor exp(λ (r(x_0) - A)) turns that into p(path) exp(λ r(x_0)), whose x_0-marginal is
the tilted distribution p(x) exp(λ r(x)); so ``select="sample"`` targets it for every potential as K grows:

* "difference": A = r at the last resampling step (the potentials telescope), w = exp(λ (r - r_last));
* "immediate": A = Σ_t r_t;  "max": A = Σ_t max_{j<=t} r_j;
* "add": A = Σ_t S_t = Σ_t Σ_{j<=t} r_j, the reward of resampling step j counted once for every later one.

``fkd_class.py`` makes the same correction at its terminal step (exp(λ r) over the product of the potentials its
particles were resampled with, for "max", "add" and "rt"; exp(λ (r - r_prev)) for "diff"). Its adaptive resampling
(ESS below K / 2) drops the weights of a step it does not resample at; here W carries them to the next resampling
step, so that the correction stays exact. Exact as K grows, that is: with "add", "max" and "immediate" the
resampling steps themselves tilt the particles far past the target (exp(λ A) grows with every step), and once the
population has lost its low-reward particles no final weight brings them back. On the 2-D mixture of
``python -m tasks.studies.particle_benchmark --sweep`` (λ = 2, K = 64, resampling at every step)
``select="sample"`` lands at cell TV 0.55 ("add"), 0.37 ("max"), 0.55 ("immediate") and 0.02 ("difference") from
the target; "add" resampling at three steps only (``every=5``) comes to 0.05.

``select="best"`` (default) keeps the highest final reward, the figure best-of-N reports: a search, not a sample of
the tilted distribution; where that distribution keeps mass at low reward (a moderate λ), it overshoots the reward.
The reward is only ever evaluated, never differentiated (unless ``step_size > 0``): indicator rewards, hard
classifier decisions and black-box scores steer as well as smooth ones.

Simplex flows (sequences) run the same loop with the stochastic step :func:`guidance.sde.simplex_step`; their
clean estimate is the hard sequence argmax p(x_1 | x_s), and ``step_size > 0`` adds the straight-through
guidance of :mod:`guidance.methods.straight_through` to the velocity.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..flow import x0_from_velocity
from ..noise import check_generator
from ..objectives import Objective, objective_gradient
from ..sampler import start_state, step_end
from ..sde import check_noise_scale, sde_step, simplex_step
from ..sequences.simplex import SimplexFlow, check_no_image_size, tangent_projection
from .common import CountingModel, DivergenceMonitor, MethodResult, check_count, check_nonnegative, reference_scale

__all__ = ["POTENTIALS", "RESAMPLERS", "SELECTIONS", "ancestors", "ess", "particles", "potential_of",
           "resampling_schedule"]

POTENTIALS = ("difference", "max", "add", "immediate")
RESAMPLERS = ("systematic", "multinomial")
SELECTIONS = ("best", "sample", "all")


def _choice(value, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def ancestors(log_weights: torch.Tensor, resampler: str, generator: torch.Generator | None) -> torch.Tensor:
    """(B, K) indices in 0..K-1 of the particles that survive, from (B, K) unnormalised log-weights.

    * ``"multinomial"``: K independent draws a_j ~ Cat(w);
    * ``"systematic"``: one u ~ U[0, 1) per row, a_j = min{k : Σ_{l<=k} w_l > (u + j) / K} (Kitagawa 1996):
      particle k is kept floor(K w_k) or ceil(K w_k) times, the lowest-variance unbiased scheme.

    Both keep particle k E[count_k] = K w_k times."""
    _choice(resampler, RESAMPLERS, "resampler")
    if not bool(torch.isfinite(log_weights).any(-1).all()):
        raise ValueError("the particle weights are all zero or NaN for some output: the rewards must be finite")
    w = torch.softmax(log_weights.double(), dim=-1)
    b, k = w.shape
    draw = generator.device if generator is not None else w.device
    if resampler == "multinomial":
        return torch.multinomial(w.to(draw), k, replacement=True, generator=generator).to(w.device)
    u = torch.rand((b, 1), generator=generator, device=draw, dtype=torch.float64).to(w.device)
    positions = (u + torch.arange(k, device=w.device, dtype=torch.float64)) / k
    cumulative = w.cumsum(-1)
    cumulative[:, -1] = 1.0  # no index past the end through rounding
    return torch.searchsorted(cumulative, positions, right=True).clamp_max(k - 1)


def potential_of(kind: str, reward: torch.Tensor, previous: torch.Tensor, best: torch.Tensor,
                 total: torch.Tensor) -> torch.Tensor:
    """G of one resampling step: r - r_prev ("difference"), the maximum so far ("max", ``best`` already includes
    r), the sum so far ("add", ``total`` already includes r: fkd_class.py's accumulated rewards) or r
    ("immediate")."""
    if kind == "difference":
        return reward - previous
    if kind == "max":
        return best
    if kind == "add":
        return total
    return reward


def resampling_schedule(every: int, window: tuple[int, int] | None, num_steps: int) -> range:
    """The steps at which particles are scored and may be resampled: start, start + every, ... below stop, with
    ``window = (start, stop)`` (default (every, num_steps - 1)). The last step is never one of them: the final
    selection scores the finished particles. FK-steering's ``resample_frequency``, ``resampling_t_start`` and
    ``resampling_t_end`` are ``every``, ``start`` and ``stop - 1``."""
    last = num_steps - 1
    if window is None:
        return range(every, last, every)
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2 or not all(
            isinstance(w, int) and not isinstance(w, bool) for w in window):
        raise ValueError(f"window must be a pair (start, stop) of step indices, got {window!r}")
    start, stop = window
    if not 0 <= start < stop <= last:
        raise ValueError(f"window {tuple(window)} lies outside the steps particles can be resampled at: need "
                         f"0 <= start < stop <= {last} (num_steps - 1; the last step is the final selection)")
    return range(start, stop, every)


def ess(log_weights: torch.Tensor) -> torch.Tensor:
    """(B,) effective sample size 1 / Σ w_k² of normalised weights."""
    w = torch.softmax(log_weights.double(), dim=-1)
    return 1.0 / w.square().sum(-1)


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of the flat (B·K, ...) tensor ``t`` picked per output by (B, K) indices into that output's K."""
    b = index.shape[0]
    k = t.shape[0] // b  # particles per output
    flat = (torch.arange(b, device=index.device)[:, None] * k + index).reshape(-1)
    return t[flat.to(t.device)]


@torch.no_grad()
def particles(
    model,
    objective: Objective,
    *,
    num_steps: int = 28,
    cond: Any = None,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    latents: torch.Tensor | None = None,
    decode: bool = True,
    on_step_end: Callable | None = None,
    particles: int = 8,
    every: int = 1,
    window: tuple[int, int] | None = None,
    ess_threshold: float | None = None,
    temperature: float = 10.0,
    potential: str = "difference",
    resampler: str = "systematic",
    noise_scale: float = 4.0,
    select: str = "best",
    step_size: float = 0.0,
    reward_batch: int | None = None,
) -> MethodResult:
    """Sequential Monte Carlo with K particles per output, resampled on the reward of their clean estimates.

    Args:
        model: a FlowModel (images, latents) or a :class:`~guidance.sequences.simplex.SimplexFlow` (sequences).
        objective: the loss L; the reward is r = -L, evaluated on x0_hat (decoded for pixel objectives; the hard
            sequence argmax p(x_1 | x_s) on simplex flows) and never differentiated unless ``step_size > 0``.
        generator: a torch.Generator; draws the starting noise, the SDE noise and the resampling.
        batch_size: outputs (default 1); ``latents``, when given, hold all B·K starting points (output b's
            particles are rows b·K .. b·K + K - 1, as for best_of_n).
        callback: each step, before the update, ``{"step", "sigma", "x", "x0_hat", "reward"}`` (reward: (B·K,)
            on resampling steps, else None).
        particles: K >= 1, particles per output (K = 1 is one SDE sample).
        every: score and resample every ``every`` >= 1 steps (steps every, 2·every, ... before the last):
            FK-steering's ``resample_frequency``.
        window: ``(start, stop)``, resampling steps start, start + every, ... below stop, 0 <= start < stop <=
            num_steps - 1 (FK-steering's ``resampling_t_start`` and ``resampling_t_end`` + 1); None: (every,
            num_steps - 1). Needs K >= 2.
        ess_threshold: in (0, 1]: resample an output's particles only when the effective sample size of their
            accumulated weights falls below ``ess_threshold`` · K (FK-steering's ``adaptive_resampling`` uses
            0.5); between resamplings the weights accumulate, and the final weights carry what is left. None
            (default): resample at every resampling step. Needs K >= 2 and at least one resampling step.
        temperature: λ >= 0, weights ∝ exp(λ · G); the target of ``select="sample"`` is p(x) exp(λ r(x)).
        potential: G, the reward's increment since the last resampling step ("difference"), its maximum so far
            ("max"), the sum of the rewards so far ("add") or the current reward ("immediate"); the final weights
            correct each to the same target (module docstring).
        resampler: "systematic" (default, lower variance) or "multinomial".
        noise_scale: η >= 0 of the SDE (:mod:`guidance.sde`; for sequences: re-noisings per position). Resampled
            copies of one particle only part ways through this noise; η = 0 leaves them identical. The default 4
            is measured on ``python -m tasks.studies.particle_benchmark`` (K 8, 20 steps, resampling every step): η 1,
            2, 4, 8 put 0.70, 0.75, 0.84, 0.93 of the mixture's outputs in the rewarded region and give 0.18, 0.24,
            0.34, 0.40 of the sequences the motif (best-of-8: 0.50 and 0.08). Larger η needs more steps: past
            η = 3 the last steps of the Euler-Maruyama discretisation amplify the directions in which the data
            hardly vary (:mod:`guidance.sde`); η = 8 needs about 200 uniform steps on the exact 48-dimensional
            prior of ``python -m tasks.studies.sde_steps``, η <= 4 none beyond the ODE's.
        select: "best" keeps each output's particle of highest final reward (a search: it overshoots the
            tilted target's reward wherever that target keeps mass at low reward); "sample" draws one by the final
            weights exp(W + λ (r - A)) (module docstring), which targets p(x) exp(λ r(x)) as K grows; "all" returns
            every particle (B·K results, output b's particles in rows b·K .. b·K + K - 1) with their weights.
        step_size: >= 0; a FlowChef step x <- x - step_size ∇_{x0_hat} L(x0_hat) at every step (images), or
            straight-through guidance of that scale added to the velocity (sequences); 0: gradient-free.
        reward_batch: score at most this many particles per objective call (default: all B·K at once).

    Returns:
        :class:`MethodResult`; ``nfe`` = K × num_steps per output, as best_of_n's with N = K. ``x`` (and
        ``image``) hold B results, or B·K with ``select="all"``. ``info``: ``objective_calls`` (particles scored
        per output), ``resampling_steps`` (the steps the particles were scored at), ``mean_reward`` the particles'
        mean reward at each of them, ``ess`` (resampling steps, B) the effective sample size of the accumulated
        weights at each (before resampling), ``resampled`` (resampling steps, B) whether the output's particles
        were resampled there, ``resamplings`` (B,) how often, ``unique_ancestors`` (resampling steps, B) the
        distinct particles kept, ``ancestry`` (B, K) the step-0 particle each final particle descends from,
        ``rewards`` (B, K) final rewards, ``weights`` (B, K) the normalised final weights, ``final_ess`` (B,)
        their effective sample size, ``reward`` the rewards of the returned results ((B,), or (B·K,) with "all"),
        ``chosen`` (B,) the particle returned ("best", "sample"), ``layout`` (with "all") the order of the
        results, for sequences ``tokens`` (B, L) or (B·K, L).
    """
    if not isinstance(objective, Objective):
        raise ValueError(f"particles needs an Objective whose loss gives the reward r = -L, got "
                         f"{type(objective).__name__}")
    k = check_count(particles, "particles (K)", minimum=1)
    check_count(every, "every (steps between resamplings)", minimum=1)
    lam = check_nonnegative(temperature, "temperature (λ)")
    _choice(potential, POTENTIALS, "potential")
    _choice(resampler, RESAMPLERS, "resampler")
    _choice(select, SELECTIONS, "select")
    if ess_threshold is not None and (isinstance(ess_threshold, bool) or not isinstance(ess_threshold, (int, float))
                                      or not 0 < ess_threshold <= 1):
        raise ValueError(f"ess_threshold must be a number in (0, 1] (resample when the ESS falls below it times K) "
                         f"or None (resample at every resampling step), got {ess_threshold!r}")
    given = [f"{name}={value!r}" for name, value in (("window", window), ("ess_threshold", ess_threshold))
             if value is not None]
    if k == 1 and given:
        raise ValueError(f"{' and '.join(given)} {'choose' if len(given) > 1 else 'chooses'} when the particles are "
                         f"resampled, which does nothing with particles=1: drop {'them' if len(given) > 1 else 'it'} "
                         f"or use particles >= 2")
    eta = check_noise_scale(noise_scale)
    check_nonnegative(step_size, "step_size")
    if reward_batch is not None:
        check_count(reward_batch, "reward_batch", minimum=1)
    check_generator(generator)
    if isinstance(generator, (list, tuple)):
        raise ValueError("particles draws all its noise from one torch.Generator; pass a single generator")
    if generator is None:
        raise ValueError("particles draws noise at every step and at every resampling: pass an explicit generator, "
                         "e.g. generator=torch.Generator().manual_seed(0)")
    if latents is not None:
        if latents.shape[0] % k:
            raise ValueError(f"latents hold {latents.shape[0]} starting points, not a multiple of particles={k}")
        batch_size = latents.shape[0] // k
    batch = 1 if batch_size is None else check_count(batch_size, "batch_size", minimum=1)

    sequences = isinstance(model, SimplexFlow)
    counted = CountingModel(model)
    if sequences:
        check_no_image_size(height, width, "particles on a simplex flow")
        model.condition(cond)
        sigmas = model.sigmas(num_steps).to(model.device)
        x = model.initial_state(batch * k, generator, latents)
        if step_size > 0:
            from .straight_through import check_sequence_objective

            check_sequence_objective(objective, model)
    else:
        state = start_state(model, cond, num_steps, height, width, generator, batch * k, latents)
        x, cond, sigmas = state.x, state.cond, state.sigmas
        objective.bind(model, state.height, state.width)
    schedule = resampling_schedule(every, window, len(sigmas) - 1)
    if ess_threshold is not None and not schedule:
        raise ValueError(f"ess_threshold={ess_threshold} does nothing: {len(sigmas) - 1} steps with every={every} "
                         f"leave no resampling step; drop it, or use more steps or a smaller every")

    def reward(z: torch.Tensor) -> torch.Tensor:
        """r = -L of the (B·K, ...) clean estimates, in chunks of ``reward_batch``; NaN is refused."""
        size = reward_batch or z.shape[0]
        r = torch.cat([-objective(model, z[j:j + size]).detach().double() for j in range(0, z.shape[0], size)])
        if not bool(torch.isfinite(r).all()):
            raise ValueError("the objective returned NaN or infinite losses for some particles: particle weights "
                             "need finite rewards; check the objective on these inputs")
        return r.reshape(batch, k).to(x.device)

    def clean(x: torch.Tensor, v: torch.Tensor, p: torch.Tensor | None, sigma) -> torch.Tensor:
        if sequences:
            return F.one_hot(p.argmax(-1), model.vocab_size).to(torch.float32)
        return x0_from_velocity(x, v, sigma)

    previous = torch.zeros(batch, k, dtype=torch.float64, device=x.device)
    best = torch.full((batch, k), -math.inf, dtype=torch.float64, device=x.device)
    total = torch.zeros(batch, k, dtype=torch.float64, device=x.device)  # Σ r so far ("add")
    applied = torch.zeros(batch, k, dtype=torch.float64, device=x.device)  # A: Σ G along the ancestry
    log_w = torch.zeros(batch, k, dtype=torch.float64, device=x.device)  # W: λ G since the last resampling
    identity = torch.arange(k, device=x.device).expand(batch, k)
    origin = identity.clone()
    ess_log, resampled_log, unique_log, steps_log, mean_log, calls = [], [], [], [], [], 0
    monitor = DivergenceMonitor("particles", f"use a smaller step_size than {step_size}", enabled=step_size > 0,
                                reference=reference_scale(model, x) if not sequences else 1.0)
    for i in tqdm(range(num_steps), disable=not progress, desc="particles"):
        s_i, s_next = sigmas[i], sigmas[i + 1]
        p = None
        if sequences:
            p = model.endpoint(x, s_i)
            counted.nfe += 1
            v = model.path.velocity(x, p, s_i)
        else:
            v = counted.velocity(x, s_i, cond)
        x0_hat = clean(x, v, p, s_i)
        if step_size > 0 and i < num_steps - 1:  # gradient-assisted variant
            if sequences:
                from .straight_through import straight_through_gradient

                _, g = straight_through_gradient(objective, model, p, x0_hat[None])
                v = v + step_size * tangent_projection(x, g)
            else:
                _, g = objective_gradient(objective, model, x0_hat)  # = ∇_x L(x - s_i v), v held fixed
                x = x - step_size * g
                x0_hat = x0_from_velocity(x, v, s_i)
            calls += k
        r = None
        if i in schedule:
            r = reward(x0_hat)
            calls += k
            best, total = torch.maximum(best, r), total + r
            g_t = potential_of(potential, r, previous, best, total)
            log_w, applied, previous = log_w + lam * g_t, applied + g_t, r
            ess_now = ess(log_w)
            ess_log.append(ess_now)
            due = torch.ones(batch, dtype=torch.bool, device=x.device) if ess_threshold is None else (
                ess_now.to(x.device) < ess_threshold * k)
            resampled_log.append(due.cpu())
            a = identity
            if bool(due.any()):
                a = torch.where(due[:, None], ancestors(log_w, resampler, generator), identity)
                log_w = torch.where(due[:, None], torch.zeros_like(log_w), log_w)
            unique_log.append(torch.tensor([len(torch.unique(row)) for row in a]))
            steps_log.append(i)
            mean_log.append(float(r.mean()))
            x, v, x0_hat = _gather(x, a), _gather(v, a), _gather(x0_hat, a)
            p = _gather(p, a) if p is not None else None
            previous, best, total = previous.gather(1, a), best.gather(1, a), total.gather(1, a)
            applied, origin = applied.gather(1, a), origin.gather(1, a)
        if callback is not None:
            callback({"step": i, "sigma": s_i, "x": x, "x0_hat": x0_hat,
                      "reward": None if r is None else r.reshape(-1)})
        if sequences:
            x = simplex_step(model, x, v, p, s_i, s_next, eta, generator)
        else:
            x = sde_step(x, v, s_i, s_next, eta, generator)
        x = step_end(on_step_end, i, s_i, s_next, {"x": x})
        monitor.update(x, i)
    monitor.finish()

    final = F.one_hot(model.tokens(x), model.vocab_size).to(torch.float32) if sequences else x
    rewards = reward(final)
    calls += k
    log_w = log_w + lam * (rewards - applied)
    info: dict[str, Any] = {
        "objective_calls": calls,
        "resampling_steps": steps_log,
        "mean_reward": mean_log,
        "ess": torch.stack(ess_log).float().cpu() if ess_log else torch.zeros(0, batch),
        "resampled": torch.stack(resampled_log) if resampled_log else torch.zeros(0, batch, dtype=torch.bool),
        "resamplings": (torch.stack(resampled_log).sum(0) if resampled_log
                        else torch.zeros(batch, dtype=torch.long)),
        "unique_ancestors": torch.stack(unique_log) if unique_log else torch.zeros(0, batch, dtype=torch.long),
        "ancestry": origin.cpu(),
        "rewards": rewards.float().cpu(),
        "weights": torch.softmax(log_w, -1).float().cpu(),
        "final_ess": ess(log_w).float().cpu(),
    }
    if select == "all":
        info["reward"] = rewards.reshape(-1).float().cpu()
        info["layout"] = (f"{batch * k} results, {k} particles per output: output b's are rows b·{k} .. b·{k} + "
                          f"{k - 1}, in the order of info['rewards'][b] and info['weights'][b]")
    else:
        chosen = rewards.argmax(1) if select == "best" else ancestors(log_w, "multinomial", generator)[:, 0]
        x = _gather(x, chosen[:, None])
        info["reward"] = rewards.gather(1, chosen[:, None])[:, 0].float().cpu()
        info["chosen"] = chosen.cpu()
    image = None
    if sequences:
        info["tokens"] = model.tokens(x)
    elif decode:
        image = model.decode(x)
    nfe = counted.nfe * k
    return MethodResult(x=x, image=image, nfe=nfe, sigmas=sigmas, info=info)
