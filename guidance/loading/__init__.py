"""Loading and storing: everything between flowsteer and the disk or the device.

* :mod:`~guidance.loading.models`: ``load_model`` / ``load_decoder`` (a hub id, a local folder, a diffusers pipeline
  or ``"default"`` to an adapter of ``guidance.backbones``), ``ModelNotFoundError``, quiet loading;
* :mod:`~guidance.loading.manifest`: the SHA-256 manifest of a model folder (damaged-file checks);
* :mod:`~guidance.loading.files`: atomic file writes;
* :mod:`~guidance.loading.devices`: device and dtype checks;
* :mod:`~guidance.loading.images`: images in and out of flowsteer's form (tensors in [-1, 1], NCHW), diffusers'
  ``output_type``.

The public names are also ``guidance``'s own (``guidance.load_model``, ``guidance.ModelNotFoundError``).
"""
