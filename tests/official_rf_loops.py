"""The official RF-Solver and FireFlow loops, transcribed for the tests in float64: ``denoise`` of
wangjiangshan0725/RF-Solver-Edit 3388e29 (``FLUX_Image_Edit/src/flux/sampling.py``; the same loop is
``denoise_rf_solver`` of HolmesShuan/FireFlow-Fast-Inversion-of-Rectified-Flow-for-Image-Semantic-Editing 98588a6)
and ``denoise_fireflow`` of the latter's ``src/flux/sampling.py``, without the attention-feature injection. Their
t and prediction are this toolkit's s and v."""

import torch


def denoise(velocity, img: torch.Tensor, timesteps: list, inverse: bool, kind: str) -> torch.Tensor:
    """Run the loop of ``kind`` ("rf_solver" or "fireflow") over ``timesteps`` (1 -> 0; reversed when
    ``inverse``), with ``velocity(img, t)`` the network."""
    if inverse:
        timesteps = timesteps[::-1]
    next_step_velocity = None
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
        if kind == "fireflow" and next_step_velocity is not None:
            pred = next_step_velocity
        else:
            pred = velocity(img, t_curr)
        img_mid = img + (t_prev - t_curr) / 2 * pred
        pred_mid = velocity(img_mid, t_curr + (t_prev - t_curr) / 2)
        if kind == "fireflow":
            next_step_velocity = pred_mid
            img = img + (t_prev - t_curr) * pred_mid
        else:
            first_order = (pred_mid - pred) / ((t_prev - t_curr) / 2)
            img = img + (t_prev - t_curr) * pred + 0.5 * (t_prev - t_curr) ** 2 * first_order
    return img
