"""Particle search: sequential Monte Carlo over the flow's SDE, steered by a reward that needs no gradient.

Feynman-Kac steering (Singhal et al., "A General Framework for Inference-time Scaling and Steering of Diffusion
Models", 2025, official code: zacharyhorvitz/Fk-Diffusion-Steering, ``fkd_class.py``) carried to rectified flows
with the stochastic sampler of :mod:`guidance.sde` (as Kim et al., "Inference-Time Scaling for Flow Models via
Stochastic Generation and Rollover Budget Forcing", 2025, do). K particles per output follow the SDE; every
``every`` steps each is scored on its clean estimate, r = -L(x0_hat), and the K are resampled with weights
∝ exp(λ G), λ = ``temperature``::

    x^1..x^K ~ N(0, I);  r_prev = 0;  m = -inf;  A = 0                 per output, K particles
    for i in 0 .. N-1:
        v = v_theta(x, s_i);  x0_hat = x - s_i v                       one batched call for all B·K particles
        [x = x - step_size ∇_{x0_hat} L(x0_hat)]                      optional FlowChef step (step_size > 0)
        if i > 0 and i % every == 0:                                   a resampling step
            r = -L(x0_hat);  m = max(m, r)
            G = r - r_prev  ("difference") | m ("max") | r ("immediate")
            w ∝ exp(λ G);  a ~ Resample(w)  (systematic or multinomial)
            x, r_prev, m, A = x[a], r[a], m[a], A[a] + G[a]
        x = sde_step(x, v, s_i, s_{i+1}, η)                            deterministic on the last step
    r = -L(x_0)
    keep argmax_k r^k ("best")  or  one particle drawn with w ∝ exp(λ (r - A)) ("sample")

With the "difference" potential the products of potentials telescope to exp(λ r(x_0)), and the final weight
exp(λ (r - A)) corrects any potential, so ``select="sample"`` targets the tilted distribution p(x) exp(λ r(x))
as K grows; ``select="best"`` (default) keeps the highest final reward, the figure best-of-N reports. The
reward is only ever evaluated, never differentiated (unless ``step_size > 0``): indicator rewards, hard
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

__all__ = ["POTENTIALS", "RESAMPLERS", "SELECTIONS", "ancestors", "ess", "particles", "potential_of"]

POTENTIALS = ("difference", "max", "immediate")
RESAMPLERS = ("systematic", "multinomial")
SELECTIONS = ("best", "sample")


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


def potential_of(kind: str, reward: torch.Tensor, previous: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """G of one resampling step: r - r_prev ("difference"), max so far ("max", ``best`` already includes r) or r
    ("immediate")."""
    if kind == "difference":
        return reward - previous
    if kind == "max":
        return best
    return reward


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
        every: resample every ``every`` >= 1 steps (steps every, 2·every, ... before the last).
        temperature: λ >= 0, weights ∝ exp(λ · G); the target of ``select="sample"`` is p(x) exp(λ r(x)).
        potential: G, the reward's increment since the last resampling ("difference"), its maximum so far
            ("max") or the current reward ("immediate").
        resampler: "systematic" (default, lower variance) or "multinomial".
        noise_scale: η >= 0 of the SDE (:mod:`guidance.sde`; for sequences: re-noisings per position). Resampled
            copies of one particle only part ways through this noise; η = 0 leaves them identical. The default 4
            is measured on ``python -m tasks.studies.particle_benchmark`` (K 8, 20 steps, resampling every step): η 1,
            2, 4, 8 put 0.70, 0.75, 0.84, 0.93 of the mixture's outputs in the rewarded region and give 0.18, 0.24,
            0.34, 0.40 of the sequences the motif (best-of-8: 0.50 and 0.08). Larger η needs more steps: the
            Euler-Maruyama step leaves the SDE's marginals once η (s - s') nears 1.
        select: "best" keeps each output's particle of highest final reward; "sample" draws one by the final
            weights exp(λ (r - A)) (module docstring).
        step_size: >= 0; a FlowChef step x <- x - step_size ∇_{x0_hat} L(x0_hat) at every step (images), or
            straight-through guidance of that scale added to the velocity (sequences); 0: gradient-free.
        reward_batch: score at most this many particles per objective call (default: all B·K at once).

    Returns:
        :class:`MethodResult`; ``nfe`` = K × num_steps per output, as best_of_n's with N = K. ``info``:
        ``objective_calls`` (particles scored per output), ``resampling_steps``, ``mean_reward`` the particles'
        mean reward at each of them, ``ess`` (resamplings, B) the
        effective sample size before each resampling, ``unique_ancestors`` (resamplings, B) the distinct
        particles kept, ``ancestry`` (B, K) the step-0 particle each final particle descends from, ``rewards``
        (B, K) final rewards, ``reward`` (B,) that of the returned particle, ``chosen`` (B,), ``final_ess`` (B,),
        for sequences ``tokens`` (B, L).
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
    applied = torch.zeros(batch, k, dtype=torch.float64, device=x.device)
    origin = torch.arange(k, device=x.device).expand(batch, k).clone()
    ess_log, unique_log, steps_log, mean_log, calls = [], [], [], [], 0
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
        if i > 0 and i % every == 0 and i < num_steps - 1:
            r = reward(x0_hat)
            calls += k
            best = torch.maximum(best, r)
            g_t = potential_of(potential, r, previous, best)
            log_w = lam * g_t
            ess_log.append(ess(log_w))
            a = ancestors(log_w, resampler, generator)
            unique_log.append(torch.tensor([len(torch.unique(row)) for row in a]))
            steps_log.append(i)
            mean_log.append(float(r.mean()))
            x, v, x0_hat = _gather(x, a), _gather(v, a), _gather(x0_hat, a)
            p = _gather(p, a) if p is not None else None
            previous, best = r.gather(1, a), best.gather(1, a)
            applied, origin = applied.gather(1, a) + g_t.gather(1, a), origin.gather(1, a)
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
    log_w = lam * (rewards - applied)
    if select == "best":
        chosen = rewards.argmax(1)
    else:
        chosen = ancestors(log_w, "multinomial", generator)[:, 0]
    x = _gather(x, chosen[:, None])
    info: dict[str, Any] = {
        "objective_calls": calls,
        "resampling_steps": steps_log,
        "mean_reward": mean_log,
        "ess": torch.stack(ess_log).float().cpu() if ess_log else torch.zeros(0, batch),
        "unique_ancestors": torch.stack(unique_log) if unique_log else torch.zeros(0, batch, dtype=torch.long),
        "ancestry": origin.cpu(),
        "rewards": rewards.float().cpu(),
        "reward": rewards.gather(1, chosen[:, None])[:, 0].float().cpu(),
        "chosen": chosen.cpu(),
        "final_ess": ess(log_w).float().cpu(),
    }
    image = None
    if sequences:
        info["tokens"] = model.tokens(x)
    elif decode:
        image = model.decode(x)
    nfe = counted.nfe * k
    return MethodResult(x=x, image=image, nfe=nfe, sigmas=sigmas, info=info)
