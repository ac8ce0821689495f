"""``incr-ray compare``: does a config help on the user's own data? Its variants × seeds run as Ray Tune
trials, each a normal run, and the report pairs every variant with the config's own run per seed.

- :mod:`.plan` — the variants and trials, checked before Ray starts (pure);
- :mod:`.report` — per-seed differences, their intervals, ``compare.{json,md,png}`` (pure);
- :mod:`.trials` — the Tune trainable and the launcher that runs the trials that are not done.
"""
