"""Recipe ``wrong-line``: accuracy on the wrong line (Sanyal et al., AISTATS 2025) on a synthetic linear model
(``recipe.py``, built on :mod:`ratelab.analysis.wrong_line`) and on digits with a nuisance cue (``digits.py``)."""
