"""Stream the HF-named weights of a TP/PP/DP-sharded Megatron model, bucket by bucket.

What every consumer of the trainer's weights reads (the file snapshot, the broadcast into the rollout engines, the
colocated engine, the converters' export): ``stream_hf_buckets`` yields ``Bucket``s on global rank 0, each one flat
byte buffer of at most ``bucket_bytes`` (a single larger tensor gets a bucket of its own) holding HF-named tensors as
views. No rank ever holds a whole-model copy:

- layout: every rank contributes the shapes of its stage's parameters (metadata only, ``all_gather_object``), and
  every rank computes the same plan -- pipeline stages in turn, each stage's parameters in module order, each
  parameter split into its HF pieces by the one name mapping (``convert.mapping``) -- and the same bucket layout
  (``plan_buckets``, a pure function of the sizes; a bucket never spans two stages);
- TP: for each parameter the TP ranks of data-parallel replica 0 convert their shard to HF pieces (``to_hf`` of a
  shard is that rank's slice of every piece along the mapping's ``tp_axis``) and ``gather`` them to TP rank 0,
  straight into the bucket's buffer for ``tp_axis`` 0 (rank r's rows are a contiguous block of the piece), through
  one piece-sized temporary for ``tp_axis`` 1; replicated tensors come from TP rank 0 alone;
- PP: the first rank (TP 0, DP 0) of stage s > 0 fills its stage's buckets and sends each one to global rank 0 as one
  message; rank 0 receives it into a buffer of the same size;
- DP: only replica 0 takes part (the replicas hold the same weights); the other replicas only join the metadata step.

Memory (what ``tests/test_weight_stream_dist.py`` measures): beyond the model, a rank holds the bucket being filled
plus one parameter's temporaries (its local HF pieces where ``to_hf`` copies, e.g. the q/k/v split, and for
``tp_axis`` 1 the gathered piece before it is laid out), so at most ``bucket_bytes + largest tensor``. With LoRA the
merged shard W + s·B A is one more shard-sized temporary.

Collective: every rank of the world must iterate the generator to its end (ranks other than 0 yield nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_amir.config import ModelConfig
from megatron_amir.rollout.weight_sync import Bucket, align, bucket_tensors, itemsize, view_in

@dataclass(frozen=True)
class Piece:
    """One HF tensor of the plan. ``rows`` is the first-dim size it occupies in its bucket (the padded vocabulary
    for the embedding / output layer, whose padding rows are gathered and then left out of the view)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    rows: int
    tp_axis: Optional[int]

    @property
    def region_bytes(self) -> int:
        inner = 1
        for s in self.shape[1:]:
            inner *= s
        return self.rows * inner * itemsize(self.dtype) if self.shape else itemsize(self.dtype)


@dataclass(frozen=True)
class Param:
    """One Megatron parameter of a stage: its local name (as in that stage's module state_dict) and HF pieces."""

    local_name: str
    pieces: tuple[Piece, ...]


@dataclass
class BucketLayout:
    """Where the pieces of one bucket lie: (param index in the stage, piece index, byte offset); size in bytes."""

    stage: int
    slots: list[tuple[int, int, int]] = field(default_factory=list)
    nbytes: int = 0


def plan_buckets(stages: Sequence[Sequence[Param]], bucket_bytes: int) -> list[BucketLayout]:
    """Deterministic bucket layout: parameters in plan order (the pieces of one parameter stay together, they are
    gathered together), a new bucket when the next parameter does not fit in what is left of ``bucket_bytes``
    (offsets aligned to ``ALIGN``), a new bucket at every stage boundary. A parameter larger than ``bucket_bytes``
    gets a bucket of its own, of its size."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    out: list[BucketLayout] = []
    for s, params in enumerate(stages):
        cur = BucketLayout(s)
        for pi, param in enumerate(params):
            size = sum(align(p.region_bytes) for p in param.pieces)
            if cur.slots and align(cur.nbytes) + size > bucket_bytes:
                out.append(cur)
                cur = BucketLayout(s)
            for qi, piece in enumerate(param.pieces):
                off = align(cur.nbytes)
                cur.slots.append((pi, qi, off))
                cur.nbytes = off + piece.region_bytes
        if cur.slots:
            out.append(cur)
    return out


# ------------------------------------------------------------------------------------------------ the local side
@dataclass
class _Parallel:
    tp: int
    tp_rank: int
    tp_group: object
    tp_src: int  # global rank of TP rank 0 of this rank's TP group
    pp_rank: int
    dp_rank: int
    rank: int
    world: int


def _parallel() -> _Parallel:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return _Parallel(1, 0, None, rank, 0, 0, rank, world)
    group = ps.get_tensor_model_parallel_group()
    return _Parallel(ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), group,
                     ps.get_tensor_model_parallel_src_rank(), ps.get_pipeline_model_parallel_rank(),
                     ps.get_data_parallel_rank(), rank, world)


def _layer_offset(module) -> int:
    layers = getattr(getattr(module, "decoder", None), "layers", None)
    return int(layers[0].layer_number) - 1 if layers is not None and len(layers) else 0


def _local_state(modules) -> tuple[dict[str, torch.Tensor], int]:
    """This stage's tensors (the module's own state_dict names, detached views of the parameters) and its first
    global layer."""
    if len(modules) != 1:
        raise NotImplementedError("virtual pipeline chunks are not supported")
    mod = modules[0]
    return {k: v for k, v in mod.state_dict(keep_vars=False).items() if v is not None}, _layer_offset(mod)


def _lora_merged(state: dict[str, torch.Tensor], name: str, scaling: Optional[float]) -> torch.Tensor:
    """This rank's shard of W + s·B A: a column-parallel layer shards W and B by rows (A replicated), a row-parallel
    one W and A by columns (B replicated), so the local product is exactly the local block of the full one."""
    t = state[name]
    prefix = name[: -len(".weight")] if name.endswith(".weight") else None
    if scaling is None or prefix is None or prefix + ".lora_A" not in state:
        return t
    from megatron_amir.model.lora import merge_weight

    return merge_weight(t, state[prefix + ".lora_A"], state[prefix + ".lora_B"], scaling)


def local_plan(state: dict[str, torch.Tensor], layer_offset: int, model_cfg: ModelConfig, tp: int,
               vocab_size: Optional[int]) -> list[Param]:
    """The HF pieces of this stage's parameters with their FULL (TP-gathered, vocabulary-stripped) shapes, from
    meta-device copies of the shards (no memory)."""
    from megatron_amir.convert.mapping import VocabMapping, _is_skipped_mcore, mcore_tp_shard_to_hf, model_mapping
    from megatron_amir.model.lora import ADAPTER_SUFFIXES

    mm = model_mapping(model_cfg)
    out = []
    for name, t in state.items():
        if _is_skipped_mcore(name, model_cfg) or name.endswith(ADAPTER_SUFFIXES):
            continue
        mp, _ = mm.find_mcore(name)
        pieces = []
        for hf_name, shard, tp_axis in mcore_tp_shard_to_hf(name, torch.empty_like(t, device="meta"), model_cfg,
                                                            layer_offset=layer_offset):
            shape = list(shard.shape)
            if tp_axis is not None:
                shape[tp_axis] *= tp
            rows = shape[0] if shape else 1
            if isinstance(mp, VocabMapping) and vocab_size is not None:
                shape[0] = min(shape[0], int(vocab_size))
            pieces.append(Piece(hf_name, tuple(shape), t.dtype, rows, tp_axis))
        out.append(Param(name, tuple(pieces)))
    return out


def _fill_param(param: Param, state, model_cfg, lora_scaling, par: _Parallel, regions: Optional[list],
                probe: Callable[[], None]) -> None:
    """Gather one parameter's HF pieces to TP rank 0 into ``regions`` (that rank's bucket views, padded rows
    included; None on the other TP ranks)."""
    from megatron_amir.convert.mapping import model_mapping

    mp, _ = model_mapping(model_cfg).find_mcore(param.local_name)
    shard = _lora_merged(state, param.local_name, lora_scaling)
    local = mp.to_hf(shard, model_cfg)
    probe()
    del shard
    for qi, (piece, part) in enumerate(zip(param.pieces, local)):
        dst = regions[qi] if regions is not None else None
        if par.tp == 1 or piece.tp_axis is None:
            if dst is not None:
                dst.copy_(part)
            continue
        part = part.contiguous()
        if piece.tp_axis == 0:
            gather = list(dst.chunk(par.tp, dim=0)) if dst is not None else None
            dist.gather(part, gather, dst=par.tp_src, group=par.tp_group)
            probe()
        else:
            tmp = torch.empty((par.tp, *part.shape), dtype=part.dtype, device=part.device) if dst is not None else None
            dist.gather(part, list(tmp.unbind(0)) if tmp is not None else None, dst=par.tp_src, group=par.tp_group)
            probe()
            if dst is not None:
                torch.cat(list(tmp.unbind(0)), dim=piece.tp_axis, out=dst)
            del tmp
        local[qi] = None  # drop this piece's local copy before the next one is gathered
        del part


def _fill_bucket(lay: BucketLayout, params: Sequence[Param], state, model_cfg, lora_scaling, par: _Parallel,
                 buf: Optional[torch.Tensor], probe) -> None:
    """This TP group's part of filling bucket ``lay`` (``buf`` on TP rank 0, None elsewhere)."""
    by_param: dict[int, list] = {}
    for pi, qi, off in lay.slots:
        by_param.setdefault(pi, []).append((qi, off))
    for pi, slots in by_param.items():
        param = params[pi]
        regions = None
        if buf is not None:
            regions = [None] * len(param.pieces)
            for qi, off in slots:
                p = param.pieces[qi]
                regions[qi] = view_in(buf, off, p.dtype, (p.rows, *p.shape[1:]) if p.shape else ())
        _fill_param(param, state, model_cfg, lora_scaling, par, regions, probe)


class WeightStream:
    """The HF-named weights of this rank's model chunk as a stream of ``Bucket``s on global rank 0.

    Collective: construct it on every rank (the metadata exchange happens here, so rank 0 knows every name, shape
    and bucket before the first byte moves: ``update_info``), then iterate it to its end on every rank (ranks other
    than 0 yield nothing; ``drain``). ``vocab_size``: the tokenizer's vocabulary (padding rows dropped; None keeps
    them); ``lora_scaling``: merge the LoRA adapters into their weights (W + s·B A; None sends the base weights);
    ``probe``: called where the temporaries peak (memory tests). A stream is iterated once.
    """

    def __init__(self, modules, model_cfg: ModelConfig, *, bucket_bytes: int = 256 * 1024**2,
                 vocab_size: Optional[int] = None, lora_scaling: Optional[float] = None,
                 probe: Optional[Callable[[], None]] = None):
        self.model_cfg, self.lora_scaling = model_cfg, lora_scaling
        self.probe = probe or (lambda: None)
        self.par = par = _parallel()
        self._state, offset = _local_state(modules)
        mine = local_plan(self._state, offset, model_cfg, par.tp, vocab_size) if par.tp_rank == 0 and par.dp_rank == 0 \
            else None
        if par.world > 1:
            plans: list = [None] * par.world
            dist.all_gather_object(plans, (par.pp_rank, par.rank, mine))
        else:
            plans = [(par.pp_rank, par.rank, mine)]
        by_stage = {s: (r, p) for s, r, p in plans if p is not None}
        self.stages: list[list[Param]] = [by_stage[s][1] for s in sorted(by_stage)]
        self.sources = [by_stage[s][0] for s in sorted(by_stage)]
        self.layouts = plan_buckets(self.stages, bucket_bytes)
        self._used = False

    @property
    def largest(self) -> int:
        """Bytes of the largest parameter (all its pieces, padding rows included)."""
        return max(sum(p.region_bytes for p in param.pieces) for st in self.stages for param in st)

    @property
    def total_bytes(self) -> int:
        return sum(lay.nbytes for lay in self.layouts)

    def update_info(self) -> dict:
        """What a receiver needs to rebuild every bucket: vLLM's update_info lists (``names``, ``dtype_names``,
        ``shapes``) in stream order, plus each tensor's byte ``offsets`` in its bucket and ``buckets``: [[bytes,
        number of tensors], ...]."""
        names, dtypes, shapes, offsets, buckets = [], [], [], [], []
        for lay in self.layouts:
            for pi, qi, off in lay.slots:
                p = self.stages[lay.stage][pi].pieces[qi]
                names.append(p.name)
                dtypes.append(str(p.dtype).removeprefix("torch."))
                shapes.append(list(p.shape))
                offsets.append(off)
            buckets.append([lay.nbytes, len(lay.slots)])
        return {"names": names, "dtype_names": dtypes, "shapes": shapes, "offsets": offsets, "buckets": buckets}

    def __iter__(self) -> Iterator[Bucket]:
        if self._used:
            raise RuntimeError("a WeightStream is iterated once")
        self._used = True
        return self._buckets()

    def drain(self) -> None:
        """Take part in the stream without consuming it (every rank but 0, or a rank 0 that has no use for it)."""
        for _ in self:
            pass

    def collect(self) -> Optional[dict[str, torch.Tensor]]:
        """Every tensor (views into the buckets, which they keep alive: a whole-model copy on rank 0), None elsewhere."""
        out: dict[str, torch.Tensor] = {}
        for bucket in self:
            out.update(bucket.tensors)
        return out if self.par.rank == 0 else None

    def _buckets(self) -> Iterator[Bucket]:
        par, state, probe = self.par, self._state, self.probe
        device = next(iter(state.values())).device if state else torch.device("cpu")
        for lay in self.layouts:
            here = lay.stage == par.pp_rank and par.dp_rank == 0  # this rank fills the bucket (with its TP group)
            holds = here and par.tp_rank == 0
            buf = torch.empty(lay.nbytes, dtype=torch.uint8, device=device) if par.rank == 0 or holds else None
            if here:
                _fill_bucket(lay, self.stages[lay.stage], state, self.model_cfg, self.lora_scaling, par,
                             buf if holds else None, probe)
            src = self.sources[lay.stage]
            if par.rank == src and src != 0:
                dist.send(buf, dst=0)
            elif par.rank == 0 and src != 0:
                dist.recv(buf, src=src)
            if par.rank == 0:
                bucket = Bucket(buf, bucket_tensors(buf, self._entries(lay)))
                probe()
                yield bucket
                bucket.release()  # the consumer's loop variable still names it while the next bucket is filled
                del bucket
            del buf

    def _entries(self, lay: BucketLayout) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
        out = []
        for pi, qi, off in lay.slots:
            p = self.stages[lay.stage][pi].pieces[qi]
            out.append((p.name, p.dtype, p.shape, off))
        return out


def stream_hf_buckets(modules, model_cfg: ModelConfig, **kwargs) -> Iterator[Bucket]:
    """``iter(WeightStream(modules, model_cfg, **kwargs))`` (collective)."""
    return iter(WeightStream(modules, model_cfg, **kwargs))


class LiveTensorMeter:
    """Peak bytes of tensor storage that did not exist when the meter was made: call it at the points to sample
    (``WeightStream``'s ``probe``). Independent of the stream's own bookkeeping: every live torch.Tensor the garbage
    collector knows is visited and the distinct storages not seen at the start are added up. The tensors alive at
    the start are kept referenced, so their addresses cannot be reused by new allocations; ``keep`` leaves out a
    consumer's own copies. A sampling tool for tests and benchmarks (each call walks the whole heap)."""

    def __init__(self):
        import gc

        gc.collect()
        self._base = self._live()
        self._ptrs = {t.untyped_storage().data_ptr() for t in self._base}
        self.peak = 0

    @staticmethod
    def _live() -> list[torch.Tensor]:
        import gc
        import warnings

        with warnings.catch_warnings():  # isinstance() on torch's deprecated module aliases warns
            warnings.simplefilter("ignore")
            return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device.type != "meta"]

    def keep(self, t: torch.Tensor) -> None:
        self._base.append(t)
        self._ptrs.add(t.untyped_storage().data_ptr())

    def __call__(self) -> None:
        sizes = {}
        for t in self._live():
            st = t.untyped_storage()
            if st.data_ptr() not in self._ptrs:
                sizes[st.data_ptr()] = st.nbytes()
        self.peak = max(self.peak, sum(sizes.values()))
