"""Worker for tests/test_weight_stream_dist.py, run by torchrun (4 gloo processes): stream the HF weights of a
TP/PP/DP-sharded policy bucket by bucket and record, on rank 0, the streamed tensors, the reference (the full state
dict gathered with ``gather_full_state_dict`` and mapped with ``mcore_to_hf_named_tensors``) and every rank's peak
of extra tensor bytes.

Extra bytes are measured independently of the exporter's own bookkeeping (``LiveTensorMeter``): at each probe point
(where the exporter's temporaries peak) every live torch.Tensor the garbage collector knows is visited and the sizes
of the distinct storages that did not exist before the stream started are added up.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from policy_worker import layout_args, make_cfg, write_result_and_shut_down  # noqa: E402

torch.set_num_threads(1)
REAL_VOCAB = 61  # < the model's 64 rows: the padding rows must be dropped


def keep_copies(bucket, streamed: dict, meter) -> None:
    """Clone the bucket's tensors (a function, so no loop variable keeps a view of the bucket alive)."""
    for name, t in bucket.tensors:
        assert name not in streamed, name
        streamed[name] = t.clone()
        meter.keep(streamed[name])  # the test's own copies are not the exporter's memory


def main() -> None:
    ap = layout_args()
    ap.add_argument("--bucket", type=int, action="append", required=True)
    args = ap.parse_args()
    from megatron_amir.training.model_checkpoint import gather_full_state_dict
    from megatron_amir.convert.mapping import mcore_to_hf_named_tensors
    from megatron_amir.training.policy import Policy
    from megatron_amir.training.weight_stream import LiveTensorMeter, WeightStream

    cfg = make_cfg(args.tp, args.pp)
    policy = Policy(cfg)
    full = gather_full_state_dict(policy.modules())
    ref = None if full is None else dict(mcore_to_hf_named_tensors(full, cfg.model, vocab_size=REAL_VOCAB))
    del full
    gc.collect()
    runs = {}
    for bucket_bytes in args.bucket:
        meter = LiveTensorMeter()
        streamed, sizes = {}, []
        stream = WeightStream(policy.modules(), cfg.model, bucket_bytes=bucket_bytes, vocab_size=REAL_VOCAB,
                              probe=meter)
        plan = {"largest": stream.largest, "buckets": len(stream.layouts)}
        for b in stream:
            sizes.append(b.nbytes)
            keep_copies(b, streamed, meter)
            meter()
        peaks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(peaks, meter.peak)
        runs[bucket_bytes] = {"streamed": streamed, "sizes": sizes, "peaks": peaks, **plan}
    write_result_and_shut_down({"ref": ref, "runs": runs}, Path(args.out) / f"{args.name}.pt")


if __name__ == "__main__":
    main()
