"""Per-domain evaluation set: every eval sample of every domain once, tagged with its domain id.

A map-style dataset (reading through a non-shuffled ``StreamingDataset``, so remote data works)
meant for Composer's ``DistributedSampler`` path: Composer drops the sampler's padding duplicates
on the last batch, so with any number of ranks each sample is counted exactly once.

Samples are interleaved across domains in a fixed order (domain ``d``'s ``j``-th sample sits at
fraction ``(j + 0.5) / n_d``), so a prefix of the set (``eval_subset_num_batches``) still covers
every domain in proportion to its size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from streaming import Stream, StreamingDataset
from torch.utils.data import Dataset

from llmshearing.data.checks import check_shards
from llmshearing.data.dynamic_dataset import check_token_column, domain_names, to_sample
from llmshearing.data.shared_memory import prefix_registration


def interleaved_order(sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(domain, index within domain) of every sample, spread evenly across domains."""
    domains = np.concatenate([np.full(n, d, dtype=np.int64) for d, n in enumerate(sizes)])
    local = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes])
    counts = np.asarray(sizes, dtype=np.float64)[domains]
    order = np.lexsort((domains, (local + 0.5) / counts))
    return domains[order], local[order]


class DomainEvalDataset(Dataset):
    """Eval samples ``{"input_ids", "domain", "idx"}`` of several domains.

    Args:
        streams: one ``Stream`` per domain, in the order of ``set_names``.
        set_names: domain names.
        max_seq_len: truncate samples to this many tokens (default: as stored).
        samples_per_domain: use only the first this many samples of each domain (default: all).
    """

    def __init__(
        self,
        *,
        streams: Sequence[Stream],
        set_names: Sequence[str],
        max_seq_len: int | None = None,
        samples_per_domain: int | None = None,
        download_retry: int = 2,
        download_timeout: float = 60,
        validate_hash: str | None = None,
        keep_zip: bool = False,
    ) -> None:
        self.set_names = domain_names(streams, set_names)
        if samples_per_domain is not None and samples_per_domain <= 0:
            raise ValueError(f"samples_per_domain must be positive or null, got {samples_per_domain}")
        self.max_seq_len = max_seq_len
        for stream in streams:
            if stream.remote is None:  # local data is complete: every shard must be whole
                check_shards(os.path.join(stream.local, stream.split or ""))
        with prefix_registration():  # another process of the machine may be choosing a prefix now
            self.reader = StreamingDataset(
                streams=streams,
                shuffle=False,
                batch_size=1,
                download_retry=download_retry,
                download_timeout=download_timeout,
                validate_hash=validate_hash,
                keep_zip=keep_zip,
            )
        check_token_column(self.reader, self.set_names)
        sizes = [int(n) for n in self.reader.samples_per_stream]
        if samples_per_domain is not None:
            sizes = [min(n, samples_per_domain) for n in sizes]
        self.samples_per_domain = tuple(sizes)
        self._domain, local = interleaved_order(sizes)
        self._global = local + self.reader.sample_offset_per_stream[self._domain]

    def __len__(self) -> int:
        return int(self._global.size)

    def prefix_covering(self) -> int:
        """The fewest leading samples that include every domain (a domain without samples is never covered)."""
        firsts = [int(np.argmax(self._domain == d)) for d, n in enumerate(self.samples_per_domain) if n]
        return max(firsts, default=-1) + 1

    def domains_in_prefix(self, n: int) -> list[str]:
        """Names of the domains with at least one sample among the first ``n``."""
        present = set(self._domain[: max(n, 0)].tolist())
        return [name for d, name in enumerate(self.set_names) if d in present]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample_id = int(self._global[index])
        return to_sample(
            self.reader.get_item(sample_id), sample_id, int(self._domain[index]), self.max_seq_len
        )
