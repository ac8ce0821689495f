"""incr-ray: incremental teacher-student training of Hugging Face text classifiers on Ray.

The layers, each importing only those below it:

- ``cli`` — the ``incr-ray`` command;
- ``run/`` — the run folder, its manifest, the generation loop, the report;
- ``generation/`` — one generation's work: teacher scoring, student training, evaluation;
- ``data/``, ``modeling``, ``plan/`` — data sources and the split, model loading, the memory planner;
- ``method/``, ``config``, ``storage``, ``faults`` — the pure math, the typed config, files, the test seam.
"""
