"""AMIR-GRPO and the GRPO family as pure tensor functions (no Megatron import, no parallelism inside
except the optional all-reduce of global normalizers in ``prepare_batch``). See docs/algorithms.md."""

from .advantages import ADVANTAGE_ESTIMATORS, compute_advantages, register_advantage_estimator
from .aggregation import AGGREGATIONS, aggregate, register_aggregation, token_weights
from .amir import (
    AmirState,
    PairStats,
    build_pairs,
    pair_coefficients,
    pair_loss_sum,
    pair_statistics,
    seq_logprob,
)
from .batch import PreparedBatch, allreduce_sums, micro_batch_loss, prepare_batch, reduce_micro_batch_stats
from .kl import KL_ESTIMATORS, kl_penalty, kl_reward_penalty, register_kl_estimator
from .policy_loss import (
    POLICY_LOSSES,
    clipped_surrogate,
    policy_loss,
    register_policy_loss,
    tis_weight,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS", "AGGREGATIONS", "KL_ESTIMATORS", "POLICY_LOSSES",
    "AmirState", "PairStats", "PreparedBatch",
    "aggregate", "allreduce_sums", "build_pairs", "clipped_surrogate", "compute_advantages",
    "pair_statistics",
    "kl_penalty", "kl_reward_penalty", "micro_batch_loss", "pair_coefficients", "pair_loss_sum",
    "policy_loss", "prepare_batch", "reduce_micro_batch_stats", "register_advantage_estimator",
    "register_aggregation", "register_kl_estimator", "register_policy_loss", "seq_logprob",
    "tis_weight", "token_weights",
]
