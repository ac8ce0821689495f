"""A run on storage: the folder and its lock (``folder``), the typed ``run.json`` (``manifest``),
the generation loop with resume and extend (``loop``), and the report (``report``)."""
