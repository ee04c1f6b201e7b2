"""Preprocessing: put every image on a visual-token budget, count sequence lengths exactly,
apply the over-length policy, and cache the result under a fingerprint of its inputs.

``preprocess(data, model, budget=...)`` runs the stages in order; ``vlmfit preprocess`` is its
command line. The stages, the cache layout and what training reuses: docs/preprocess.md.
"""

from vlmfit.preprocess.cache import PIPELINE_VERSION, file_hash, fingerprint
from vlmfit.preprocess.options import POLICIES
from vlmfit.preprocess.pipeline import preprocess
from vlmfit.preprocess.result import (
    REFERENCE_SIZES,
    PreprocessResult,
    pitfall_table,
    problem_rows,
    truncation_risk,
)

__all__ = [
    "PIPELINE_VERSION",
    "POLICIES",
    "REFERENCE_SIZES",
    "PreprocessResult",
    "file_hash",
    "fingerprint",
    "pitfall_table",
    "preprocess",
    "problem_rows",
    "truncation_risk",
]
