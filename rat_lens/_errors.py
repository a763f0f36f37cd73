"""The one error rat_lens raises for bad input."""


class RatLensError(ValueError):
    """Bad input to rat_lens: the message names the offending value and the accepted ones."""
