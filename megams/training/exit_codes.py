"""Exit codes of `launch/pretrain.py` (documented in docs/ERRORS.md; scripts and schedulers rely on them).

    0   finished (max_steps reached, or stopped at training.exit_interval with a checkpoint)
    1   internal error: a bug in megams or a library (a traceback is printed)
    2   bad input: config, data, tokenizer or checkpoint (one `error:` line naming the field or file)
    3   a checkpoint could not be written (disk full, I/O error); the previous one is intact
    4   stopped on a NaN/inf loss or gradient (training.on_nonfinite); last good state saved
    5   a collective timed out or a rank vanished (the message names the ranks that stopped)
    75  preempted (SIGTERM / SIGUSR1): a checkpoint was saved; rerun (or the requeued job) resumes
    128+N  a second stop signal N arrived while stopping: exited at once (e.g. 143 for SIGTERM)
"""
OK = 0
INTERNAL = 1
BAD_INPUT = 2
SAVE_FAILED = 3
NONFINITE = 4
COMM_FAILURE = 5
PREEMPTED = 75  # EX_TEMPFAIL: try again later
