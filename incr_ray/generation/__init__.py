"""One generation's work: the teacher scores a block (``teacher``), a student trains on it
(``recipe``: set up, train, save, evaluate, without Ray; ``student``: its Ray Train glue and the
driver's ``fit_student``; ``trainer`` for the Hugging Face pieces, ``deepspeed_config``), and the
result is evaluated on the holdout (``evaluation``)."""
