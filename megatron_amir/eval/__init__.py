"""Evaluation: unbiased pass@k / maj@k, benchmark runs (runner), run comparison (compare), plots.

Light imports only here: the runner's model loading (Megatron, the rollout engine) is imported lazily.
"""

from megatron_amir.eval.passk import default_ks, maj_at_k, pass_at_k, pass_at_k_array
from megatron_amir.eval.results import EvalSummary, ProblemResult, ResultsError, read_results, summarize, write_results

__all__ = ["default_ks", "maj_at_k", "pass_at_k", "pass_at_k_array", "EvalSummary", "ProblemResult",
           "ResultsError", "read_results", "summarize", "write_results", "evaluate"]


def evaluate(*args, **kwargs):
    """See megatron_amir.eval.runner.evaluate."""
    from megatron_amir.eval.runner import evaluate as _evaluate

    return _evaluate(*args, **kwargs)
