"""The one exception type for user mistakes: the CLI prints its message and exits 2."""


class UserError(Exception):
    """Bad input from the user (a path, a value, a missing dependency).

    The message is one line that names what is wrong and how to fix it; no traceback is shown.
    """

    index: int | None = None  # Predictor.predict_batch: the position of the image it is about
