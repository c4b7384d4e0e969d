"""ArviZ, imported once for the diagnostics.

ArviZ 0.23 announces its coming 1.0 refactor with a :class:`FutureWarning` when it is imported.
The notice concerns ArviZ's future API, not a call of ours, and would be an error wherever
warnings are errors (our test configuration), so that one message is silenced here.
"""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=r"(?s).*ArviZ is undergoing a major refactor", category=FutureWarning
    )
    import arviz as az

__all__ = ["az"]
