"""The embedded default model (``guidance/default_model/``): its training (``python -m tasks.default_model.train
--out DIR``) and its evaluation (``python -m tasks.default_model.evaluate``, the tables of its model card)."""
