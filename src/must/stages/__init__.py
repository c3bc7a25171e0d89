"""The verbs, side by side: one module per stage of the method (``teach``, ``label``, ``train``
for the student, ``pretrain`` for SimCLR, ``evaluate``, ``experiment`` for ``must run`` and the
transfers, ``report``). They share the layers below them (data, tasks, models, store, training)
and :mod:`must.stages.common`; no stage imports another, except that ``experiment`` runs them."""
