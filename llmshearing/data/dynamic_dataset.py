"""A multi-domain ``StreamingDataset`` whose domain mix can change at every update interval, exactly.

One dataset epoch is one update interval (``interval_batches`` global batches). For every epoch the
number of samples of each domain is an integer, derived once from the proportions by largest
remainder and stored in node shared memory (so every rank and DataLoader worker, persistent ones
included, generates the same epoch) and in ``state_dict`` (so a resumed run generates it again).

Within a domain samples are drawn without replacement: each domain has a cursor into an endless
sequence of passes, each pass a permutation of the domain seeded by ``(shuffle_seed, domain, pass)``.
An epoch takes the next ``count`` positions of every domain's sequence, so a sample is drawn again
only once every sample of its domain has been drawn; when a domain is exhausted the next pass starts
(and the log says so). The epoch in which a pass ends also holds the first samples of the next pass,
shuffled together with the last ones. Everything else (partitioning over nodes, ranks and
workers, shard-aware shuffling, download, mid-epoch resumption) is streaming's own machinery: only
``resample_streams``, ``state_dict`` and ``load_state_dict`` are overridden.

Samples are ``{"input_ids": LongTensor[T], "domain": int, "idx": int}`` where ``domain`` indexes
``set_names`` and ``idx`` is the sample's global index in the dataset. ``SampleDataLoader`` batches
them into ``input_ids`` [B, T], ``domain`` [B] and ``idx`` [B] (one transfer per batch from a
DataLoader worker).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from streaming import Stream, StreamingDataset
from streaming.base.shared import SharedArray, _get_path
from streaming.base.world import World
from torch.utils.data import DataLoader

from llmshearing.data.layout import TOKENS_COLUMN
from llmshearing.data.proportions import largest_remainder_counts, validate_proportions
from llmshearing.data.shared_memory import prefix_registration

log = logging.getLogger(__name__)

_STOCK_STATE_KEYS = (
    "epoch",
    "sample_in_epoch",
    "num_canonical_nodes",
    "shuffle_seed",
    "initial_physical_nodes",
)
_RECORDS = 2  # the mix of the epoch in progress and of the next one


def to_sample(raw: dict[str, Any], sample_id: int, domain: int, max_seq_len: int | None) -> dict[str, Any]:
    """Turn an MDS row into a training sample (tokens copied to a writable int64 tensor)."""
    tokens = raw[TOKENS_COLUMN]
    if max_seq_len is not None:
        tokens = tokens[:max_seq_len]
    return {"input_ids": torch.from_numpy(tokens.astype(np.int64)), "domain": domain, "idx": int(sample_id)}


_INT64 = torch.empty(0, dtype=torch.int64)


def _shared_int64(size: int) -> torch.Tensor:
    """An int64 buffer allocated in shared memory, the way torch's default collate does in workers."""
    try:
        return _INT64.new(_INT64._typed_storage()._new_shared(size, device="cpu"))
    except AttributeError:  # a torch without that allocator: allocate, then move to shared memory
        return torch.empty(size, dtype=torch.int64).share_memory_()


def pack_samples(rows: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Collate samples into one int64 tensor of shape [B, T + 2] (see ``unpack_batch``).

    A DataLoader worker hands every tensor of a batch to the main process separately (a shared
    memory block and a file-descriptor exchange each), so a batch travels as a single tensor.
    """
    tokens = [row["input_ids"] for row in rows]
    batch, length = len(tokens), tokens[0].shape[0]
    if any(t.shape[0] != length for t in tokens):
        raise ValueError(f"samples of one batch differ in length: {sorted({t.shape[0] for t in tokens})}")
    size = batch * (length + 2)
    in_worker = torch.utils.data.get_worker_info() is not None
    flat = _shared_int64(size) if in_worker else torch.empty(size, dtype=torch.int64)
    torch.cat(tokens, out=flat[: batch * length])
    meta = flat.numpy()[batch * length :]
    meta[:batch] = [row["domain"] for row in rows]
    meta[batch:] = [row["idx"] for row in rows]
    return flat.view(batch, length + 2)


def unpack_batch(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """``input_ids`` [B, T], ``domain`` [B] and ``idx`` [B]: contiguous views of a packed batch."""
    batch, width = packed.shape
    flat, length = packed.view(-1), width - 2
    return {
        "input_ids": flat[: batch * length].view(batch, length),
        "domain": flat[batch * length : batch * (length + 1)],
        "idx": flat[batch * (length + 1) :],
    }


class SampleDataLoader(DataLoader):
    """A DataLoader of ``{"input_ids", "domain", "idx"}`` batches of samples made by ``to_sample``.

    Workers ship packed batches (``pack_samples``); iterating unpacks them in this process.
    """

    def __init__(self, dataset: Any, **kwargs: Any) -> None:
        super().__init__(dataset, collate_fn=pack_samples, **kwargs)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return map(unpack_batch, super().__iter__())


def domain_names(streams: Sequence[Stream], set_names: Sequence[str]) -> tuple[str, ...]:
    """The domain names as a tuple, one per stream (a mismatch is an error)."""
    names = tuple(set_names)
    if len(streams) != len(names):
        raise ValueError(f"got {len(streams)} streams for {len(names)} domains {list(names)}")
    return names


def check_token_column(dataset: StreamingDataset, set_names: Sequence[str]) -> None:
    """Every domain's shards must have the ``tokens`` column of the data contract."""
    for stream_id, name in enumerate(set_names):
        shard = dataset.shards[int(dataset.shard_offset_per_stream[stream_id])]
        columns = list(getattr(shard, "column_names", []))
        if TOKENS_COLUMN not in columns:
            raise ValueError(
                f"domain {name!r} ({dataset.streams[stream_id].local}) has columns {columns}, "
                f"not {TOKENS_COLUMN!r}: prepare the data with llmshearing prepare-data"
            )


def plan_for_epoch(records: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-domain (counts, start cursors) of ``epoch`` from the stored mix records.

    Each record row is ``[epoch, counts..., cursors...]``; unused rows have epoch -1. The newest
    record not after ``epoch`` applies, its counts repeating for every later epoch.
    """
    k = (records.shape[1] - 1) // 2
    usable = [row for row in records if 0 <= row[0] <= epoch]
    if not usable:
        raise RuntimeError(
            f"the data mix has no record for epoch {epoch} (records: {records[:, 0].tolist()}); "
            "set_proportions() must be called before that epoch's iterator starts"
        )
    row = max(usable, key=lambda r: r[0])
    counts = row[1 : 1 + k].copy()
    cursors = row[1 + k :] + (epoch - row[0]) * counts
    return counts, cursors


class DynamicStreamingDataset(StreamingDataset):
    """Per-domain streams mixed by integer per-interval counts that the training loop can update.

    Args:
        streams: one ``Stream`` per domain, in the order of ``set_names``, without weights.
        set_names: domain names.
        proportion: initial domain weights (sum to 1).
        interval_batches: global batches per update interval (= per dataset epoch).
        batch_size: per-device batch size (the DataLoader's).
        max_seq_len: truncate samples to this many tokens (default: as stored).
        Other arguments are ``StreamingDataset``'s.
    """

    def __init__(
        self,
        *,
        streams: Sequence[Stream],
        set_names: Sequence[str],
        proportion: Sequence[float],
        interval_batches: int,
        batch_size: int,
        max_seq_len: int | None = None,
        shuffle: bool = True,
        shuffle_seed: int = 9176,
        shuffle_algo: str = "py1e",
        shuffle_block_size: int | None = None,
        num_canonical_nodes: int | None = None,
        partition_algo: str = "relaxed",
        predownload: int | None = None,
        cache_limit: int | str | None = None,
        download_retry: int = 2,
        download_timeout: float = 60,
        validate_hash: str | None = None,
        keep_zip: bool = False,
    ) -> None:
        self.set_names = domain_names(streams, set_names)
        for stream, name in zip(streams, self.set_names, strict=True):
            if any(hasattr(stream, attr) for attr in ("proportion", "repeat", "choose")):
                raise ValueError(
                    f"the stream of domain {name!r} has a weight; give weights through `proportion` instead"
                )
        if not isinstance(interval_batches, int) or interval_batches <= 0:
            raise ValueError(f"interval_batches must be a positive integer, got {interval_batches!r}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        weights = validate_proportions(proportion, self.set_names)
        self.interval_batches = interval_batches
        self.max_seq_len = max_seq_len
        self.global_batch_size = batch_size * World.detect().num_ranks
        with prefix_registration():  # another process of the machine may be choosing a prefix now
            super().__init__(
                streams=streams,
                epoch_size=interval_batches * self.global_batch_size,
                batch_size=batch_size,
                shuffle=shuffle,
                shuffle_seed=shuffle_seed,
                shuffle_algo=shuffle_algo,
                shuffle_block_size=shuffle_block_size,
                num_canonical_nodes=num_canonical_nodes,
                partition_algo=partition_algo,
                predownload=predownload,
                cache_limit=cache_limit,
                download_retry=download_retry,
                download_timeout=download_timeout,
                validate_hash=validate_hash,
                keep_zip=keep_zip,
                batching_method="random",
            )
        check_token_column(self, self.set_names)
        self._domain_starts = [int(x) for x in self.sample_offset_per_stream]
        k = len(self.set_names)
        self._pass_cache: dict[int, tuple[int, np.ndarray]] = {}
        # Main-process copy of the mix records. Only the node's local leader generates epochs, from
        # the shared copy: it initialises it here; later changes are written by every rank alike.
        self._records = np.full((_RECORDS, 1 + 2 * k), -1, dtype=np.int64)
        self._records[-1] = np.concatenate(
            [[0], largest_remainder_counts(weights, self.epoch_size), np.zeros(k)]
        )
        self._mix_shm = SharedArray(
            self._records.shape, np.int64, _get_path(self._shm_prefix_int, f"dynmix{k}")
        )
        if self._unique_rank_world.is_local_leader:
            self._publish_records()

    # ----------------------------------------------------------------------------------- the mix
    def _publish_records(self) -> None:
        self._mix_shm[:] = self._records

    def domain_counts(self, epoch: int) -> np.ndarray:
        """Samples of each domain in ``epoch`` (one update interval), as currently scheduled."""
        return plan_for_epoch(self._records, epoch)[0]

    def domain_cursors(self, epoch: int) -> np.ndarray:
        """Samples drawn from each domain before ``epoch`` (over all passes)."""
        return plan_for_epoch(self._records, epoch)[1]

    def set_proportions(self, proportion: Sequence[float], epoch: int) -> np.ndarray:
        """Use ``proportion`` from ``epoch`` on (until changed again); returns the integer counts.

        Must be called before that epoch's iterator starts, from every rank's main process (each
        writes the same values). The mix of ``epoch - 1`` is kept (for a resumption inside it);
        earlier epochs can no longer be generated. Calling it twice with the same arguments
        changes nothing.
        """
        weights = validate_proportions(proportion, self.set_names, key="proportion")
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        started = self.next_epoch
        if epoch < started:
            raise RuntimeError(
                f"cannot change the mix of epoch {epoch}: its samples were already generated "
                f"(next epoch to start is {started})"
            )
        counts = largest_remainder_counts(weights, self.epoch_size)
        cursors = plan_for_epoch(self._records, epoch)[1]
        records = np.full_like(self._records, -1)
        if epoch > 0:
            prev_counts, prev_cursors = plan_for_epoch(self._records, epoch - 1)
            records[0] = np.concatenate([[epoch - 1], prev_counts, prev_cursors])
        records[1] = np.concatenate([[epoch], counts, cursors])
        self._records = records
        self._publish_records()
        return counts

    # -------------------------------------------------------------------- sample selection per epoch
    def _pass_order(self, stream_id: int, pass_index: int) -> np.ndarray:
        """Stream-local sample order of one pass over a domain."""
        cached = self._pass_cache.get(stream_id)
        if cached is not None and cached[0] == pass_index:
            return cached[1]
        n = int(self.samples_per_stream[stream_id])
        if self.shuffle:
            rng = np.random.default_rng([self.shuffle_seed, stream_id, pass_index])
            order = rng.permutation(n).astype(np.int64)
        else:
            order = np.arange(n, dtype=np.int64)
        self._pass_cache[stream_id] = (pass_index, order)
        return order

    def _take(self, stream_id: int, start: int, count: int, epoch: int) -> np.ndarray:
        """Global sample ids at positions ``[start, start + count)`` of a domain's pass sequence."""
        n = int(self.samples_per_stream[stream_id])
        pieces = []
        position, end = start, start + count
        while position < end:
            pass_index, offset = divmod(position, n)
            if offset == 0 and position > 0:
                log.info(
                    "domain %r: all %d samples used; starting shuffled pass %d in epoch %d",
                    self.set_names[stream_id],
                    n,
                    pass_index + 1,
                    epoch,
                )
            step = min(n - offset, end - position)
            pieces.append(self._pass_order(stream_id, pass_index)[offset : offset + step])
            position += step
        local = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
        return local + int(self.sample_offset_per_stream[stream_id])

    def resample_streams(self, epoch: int, stream_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's samples per domain from the stored mix, grouped by shard for shuffling."""
        counts, cursors = plan_for_epoch(self._mix_shm.numpy().copy(), epoch)
        stream_ids = range(self.num_streams) if stream_id is None else [stream_id]
        units, sample_ids = [], []
        for sid in stream_ids:
            ids = np.sort(self._take(sid, int(cursors[sid]), int(counts[sid]), epoch))
            if ids.size == 0:
                continue
            shard_of = np.searchsorted(self.sample_offset_per_shard, ids, side="right") - 1
            per_shard = np.bincount(shard_of, minlength=self.num_shards)
            units.append(per_shard[per_shard > 0])
            sample_ids.append(ids)
        if not sample_ids:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(units).astype(np.int64), np.concatenate(sample_ids).astype(np.int64)

    # ------------------------------------------------------------------------------------ samples
    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        raw = super().get_item(sample_id, retry)
        domain = bisect.bisect_right(self._domain_starts, sample_id) - 1
        return to_sample(raw, sample_id, domain, self.max_seq_len)

    # ----------------------------------------------------------------------------------- resumption
    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Streaming's resume state plus the mix records (Composer's ``state_dict`` contract).

        Composer checkpoints with ``num_samples == 0`` only after an epoch has been fully consumed
        (at ``EPOCH_CHECKPOINT``), so an epoch that has started and reports no samples is finished:
        the state then points at the start of the next epoch.
        """
        started = self.next_epoch - 1
        obj = super().state_dict(num_samples, from_beginning)
        if from_beginning and num_samples == 0 and started >= 0 and obj["epoch"] == started:
            obj["epoch"] = started + 1
            obj["sample_in_epoch"] = 0
        obj["mix"] = {
            "set_names": list(self.set_names),
            "samples_per_domain": [int(n) for n in self.samples_per_stream],
            "epoch_size": int(self.epoch_size),
            "records": self._records.tolist(),
        }
        return obj

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        mix = obj.get("mix")
        if mix is None:
            raise ValueError(
                "the checkpoint's train dataset state has no data mix: it was not written by "
                "DynamicStreamingDataset; resume with the data loader it was trained with"
            )
        if list(mix["set_names"]) != list(self.set_names):
            raise ValueError(
                f"the checkpoint was trained on domains {mix['set_names']}, not {list(self.set_names)}: "
                "resume with the same domains (set_names)"
            )
        if int(mix["epoch_size"]) != int(self.epoch_size):
            raise ValueError(
                f"the checkpoint's update interval holds {mix['epoch_size']} samples, this run's "
                f"{self.epoch_size}: resume with the same update interval and global batch size"
            )
        sizes = [int(n) for n in self.samples_per_stream]
        if list(mix["samples_per_domain"]) != sizes:
            raise ValueError(
                f"the data changed since the checkpoint (samples per domain {mix['samples_per_domain']} "
                f"then, {sizes} now): resume on the same MDS data"
            )
        self._records = np.asarray(mix["records"], dtype=np.int64).reshape(self._records.shape)
        self._publish_records()
        super().load_state_dict({key: obj[key] for key in _STOCK_STATE_KEYS if key in obj})
