"""The studies behind the README's tables, each run as ``python -m tasks.studies.<name>``:

* ``analytic_benchmark``: "Against exact posteriors" (methods scored on an analytic Gaussian-mixture prior, with
  the scores of ``posterior_scores``);
* ``particle_benchmark``: "Benchmark at equal NFE" (in "Particle search: rewards without a useful gradient");
* ``sequence_benchmark``: "Straight-through guidance: sequences and hard inputs" (on an exact categorical prior).

The default model's tables come from :mod:`tasks.default_model.evaluate`, the Speed table from ``flowsteer speed``.
"""
