"""The study behind ``emalora-fast distill``: not part of the library's API.

``main_job`` runs the main job (one seed, every variant), ``runs`` one LoRA run (models, data,
training, evaluation), ``study`` the seeded study (LR sweep, teacher grid, post-hoc EMA phase),
``report``/``plots``/``stats`` its tables, figures and intervals, ``data`` the embedded corpora.
Everything here calls the library (``emalora_fast.averaging``, ``emalora_fast.distill``); nothing
in the library imports it.
"""
