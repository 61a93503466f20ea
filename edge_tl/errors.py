"""The one exception type for user mistakes: the CLI prints its message and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a path, a value, a missing dependency).

    The message is one line that names what is wrong and how to fix it; no traceback is shown.
    """

    index: int | None = None  # Predictor.predict_batch: the position of the image it is about


class Terminated(KeyboardInterrupt):
    """SIGTERM (`docker stop`, Kubernetes, Slurm, `kill`), raised like Ctrl-C so that the same cleanup
    runs: temp files removed, a fine-tune's steps saved at a step boundary. The CLI exits 143."""

    raised = False  # once raised in this process (typer turns every KeyboardInterrupt into exit 130)

    def __init__(self, *args):
        super().__init__(*args)
        Terminated.raised = True
