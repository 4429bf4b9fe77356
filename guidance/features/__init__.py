"""Single features built on the core (flow, sampler, objectives, methods), one per file:

* :mod:`~guidance.features.calibration`: FLAIR's calibrated regularization weights (CRW): measure, cache, look up;
* :mod:`~guidance.features.presets`: the papers' published settings (parity presets) gathered from the methods;
* :mod:`~guidance.features.consistency`: pixel-space data consistency for a finished restoration;
* :mod:`~guidance.features.hard_inputs`: straight-through objectives on hard (non-differentiable) inputs;
* :mod:`~guidance.features.rewards`: rewards and classifiers (CLIP, hub classifiers, the bundled ones, any
  ``module:function``) as objectives, from the short specs the command line takes;
* :mod:`~guidance.features.deepinv_reconstructor`: flowsteer as a deepinv ``Reconstructor``.
"""
