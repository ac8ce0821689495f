"""One generation's work: the teacher scores a block (``teacher``), a student trains on it
(``student`` on Ray Train, ``trainer`` for the Hugging Face pieces, ``deepspeed_config``), and the
result is evaluated on the holdout (``evaluation``)."""
