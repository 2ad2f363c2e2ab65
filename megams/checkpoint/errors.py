"""The one exception of megams.checkpoint: a problem with a checkpoint or model directory, phrased for
the user (it names the file and what was expected)."""


class CheckpointError(ValueError):
    pass
