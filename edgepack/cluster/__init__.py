"""Builds that outgrow one machine: ``--cluster ADDRESS`` runs edgepack's units of work as Ray tasks.

``connect`` (the address, a fast failure when nothing answers, the one place Ray is imported), ``ship``
(the project sent once per run), ``builds`` (one task per project x target: ``compare`` and ``build``),
``ranking`` (the tuning search's per-layer sensitivity ranking, one task per layer), ``trials`` (the
tuning search's candidates of one round, one task per candidate build) and ``evaluation``
(a large evaluation set in shards, one task each, merged in sample order). Importing this package does
not import Ray.
"""
