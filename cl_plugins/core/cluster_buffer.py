"""ExStream's per-class buffer of cluster centroids with counts (Hayes, Cahill and Kanan, ICRA
2019), vectorised over classes.

Each key (task label, class label) owns at most ``capacity`` clusters: a centroid (a vector
of the embedding's size) and a count (how many stream samples it summarises). An incoming
embedding z of key k:

- if k holds fewer than ``capacity`` clusters: z becomes a new cluster, count 1;
- otherwise the two closest clusters of k, i < j (squared Euclidean distance, the smallest
  (i, j) on ties, the flat argmin over the symmetric distance matrix with an infinite
  diagonal), merge into their count-weighted mean (n_i c_i + n_j c_j) / (n_i + n_j) with count
  n_i + n_j, stored in slot j, and z takes slot i with count 1.

This is the rule of the authors' code (tyler-hayes/ExStream, ``ExStream.py``,
``_stream_clustering_class_buffers``: the merged cluster goes to the larger index, the new
sample to the smaller; ``_l2_dist_metric``: summed squared differences, diagonal set to inf).

Vectorisation. The samples of one key must be processed one after another (each merge changes
the next distances), but different keys never interact. ``insert`` therefore walks the batch
in *rounds*: round r takes the r-th sample of every key present in the batch (stream order
within a key is kept) and processes all of them at once with batched tensor operations. The
Python loop runs max over keys of (samples of that key in the batch) times, e.g. about n / 2
for a class-IL batch of n samples from 2 classes, and each round costs O(keys x capacity x d).
The pairwise squared distances of each key's clusters are kept in a cache ``[keys, capacity,
capacity]`` and only the two changed rows and columns are recomputed after an insertion, so a
round never recomputes a whole distance matrix.

Memory: ``nbytes`` counts the allocated storage that the method needs, every slot of every key:
the centroids (``capacity x d`` values of the centroid dtype), the counts (int64) and the two
int64 labels of each key; the distance cache (``capacity^2`` float values per key, derivable
from the centroids) is reported apart, ``cache_nbytes``. ``capacity_for_bytes`` converts a
total byte budget (e.g. ER's ``ReplayBuffer.nbytes``) and a number of keys into a capacity.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from cl_plugins.core.checks import check_int

Key = Tuple[int, int]  # (task label, class label)


def capacity_for_bytes(total_bytes: int, n_keys: int, dim: int, itemsize: int = 4) -> int:
    """The largest per-key capacity whose ``nbytes`` fits ``total_bytes`` for ``n_keys`` keys
    of ``dim``-dimensional centroids: per key, capacity x (dim x itemsize + 8) + 16 bytes."""
    per_key = total_bytes // check_int("n_keys", n_keys, 1)
    return max(0, (per_key - 16) // (check_int("dim", dim, 1) * itemsize + 8))


class ClusterBuffer:
    def __init__(self, capacity: int, dtype: torch.dtype = torch.float32, device="cpu"):
        self.capacity = check_int("capacity", capacity, 2)
        self.dtype, self.device = dtype, torch.device(device)
        self.keys: List[Key] = []  # row r holds key keys[r]
        self._row: Dict[Key, int] = {}
        self.centroids: Optional[Tensor] = None  # [rows, capacity, d]
        self.counts = torch.zeros((0, self.capacity), dtype=torch.long, device=self.device)
        self.sizes = torch.zeros(0, dtype=torch.long, device=self.device)
        self.dist: Optional[Tensor] = None  # [rows, capacity, capacity], inf where invalid
        self.n_seen = 0

    # ---------------------------------------------------------------------- views
    def __len__(self) -> int:
        return int(self.sizes.sum())

    @property
    def nbytes(self) -> int:
        if self.centroids is None:
            return 0
        return (self.centroids.nelement() * self.centroids.element_size()
                + self.counts.nelement() * 8 + 16 * len(self.keys))

    @property
    def cache_nbytes(self) -> int:
        return 0 if self.dist is None else self.dist.nelement() * self.dist.element_size()

    def contents(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(centroids [N, d], labels [N], task labels [N], counts [N]) of every cluster, key by
        key (rows in order of first appearance), slot order within a key."""
        if self.centroids is None:
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            return torch.zeros((0, 0), dtype=self.dtype, device=self.device), empty, empty, empty
        valid = torch.arange(self.capacity, device=self.device)[None] < self.sizes[:, None]
        keys = torch.tensor(self.keys, dtype=torch.long, device=self.device).reshape(-1, 2)
        rows = torch.nonzero(valid)[:, 0]
        return (self.centroids[valid], keys[rows, 1], keys[rows, 0], self.counts[valid])

    # ---------------------------------------------------------------------- inserts
    def _rows_for(self, y: Tensor, t: Tensor, d: int) -> Tensor:
        pairs = torch.stack([t, y], 1).tolist()
        new = [tuple(p) for p in dict.fromkeys(map(tuple, pairs)) if tuple(p) not in self._row]
        if self.centroids is None:
            self.centroids = torch.zeros((0, self.capacity, d), dtype=self.dtype,
                                         device=self.device)
            self.dist = torch.zeros((0, self.capacity, self.capacity), dtype=self.dtype,
                                    device=self.device)
        if d != self.centroids.shape[2]:
            raise ValueError(f"ClusterBuffer.insert: embeddings have {d} values, the buffer "
                             f"stores {self.centroids.shape[2]}")
        if new:
            k, c = len(new), self.capacity
            for key in new:
                self._row[key] = len(self.keys)
                self.keys.append(key)
            self.centroids = torch.cat([self.centroids, self.centroids.new_zeros((k, c, d))])
            self.counts = torch.cat([self.counts, self.counts.new_zeros((k, c))])
            self.sizes = torch.cat([self.sizes, self.sizes.new_zeros(k)])
            self.dist = torch.cat([self.dist, self.dist.new_full((k, c, c), float("inf"))])
        return torch.tensor([self._row[tuple(p)] for p in pairs], dtype=torch.long,
                            device=self.device)

    @torch.no_grad()
    def insert(self, z: Tensor, y: Tensor, t: Tensor) -> None:
        """Offer embeddings ``z`` [n, d] with labels ``y`` and task labels ``t``, in order."""
        if z.shape[0] == 0:
            return
        z = z.detach().flatten(1).to(self.device, self.dtype)
        rows = self._rows_for(y.detach().cpu().long(), t.detach().cpu().long(), z.shape[1])
        # rank of each sample among the samples of its key, in stream order
        order = torch.argsort(rows, stable=True)
        sorted_rows = rows[order]
        start = torch.ones_like(sorted_rows, dtype=torch.bool)
        start[1:] = sorted_rows[1:] != sorted_rows[:-1]
        first = torch.cummax(torch.where(start, torch.arange(len(rows), device=rows.device),
                                         0), 0).values
        rank = torch.empty_like(rows)
        rank[order] = torch.arange(len(rows), device=rows.device) - first
        for r in range(int(rank.max()) + 1):  # rounds: one sample per key, keys in parallel
            sel = rank == r
            self._insert_round(rows[sel], z[sel])
        self.n_seen += z.shape[0]

    def _set_distances(self, rows: Tensor, slots: Tensor) -> None:
        """Recompute row and column ``slots[k]`` of the distance cache of ``rows[k]`` (the
        pairs (row, slot) distinct; a row may appear twice, with two slots)."""
        c = self.centroids[rows, slots]  # [k, d]
        d2 = ((self.centroids[rows] - c[:, None]) ** 2).sum(-1)  # [k, capacity]
        ids = torch.arange(self.capacity, device=self.device)
        d2 = d2.masked_fill((ids[None] >= self.sizes[rows, None]) | (ids[None] == slots[:, None]),
                            float("inf"))
        self.dist[rows, slots, :] = d2
        self.dist[rows, :, slots] = d2  # ((a - b) ** 2).sum() == ((b - a) ** 2).sum() exactly

    def _insert_round(self, rows: Tensor, z: Tensor) -> None:
        full = self.sizes[rows] >= self.capacity
        r1, z1 = rows[~full], z[~full]
        if r1.numel():  # room left: the sample is a new cluster of count 1
            s1 = self.sizes[r1].clone()
            self.centroids[r1, s1] = z1
            self.counts[r1, s1] = 1
            self.sizes[r1] += 1
            self._set_distances(r1, s1)
        r2, z2 = rows[full], z[full]
        if r2.numel():  # full: merge the two closest clusters, the sample takes a slot
            c = self.capacity
            flat = self.dist[r2].reshape(len(r2), c * c).argmin(1)
            a, b = flat // c, flat % c
            i, j = torch.minimum(a, b), torch.maximum(a, b)
            ni, nj = self.counts[r2, i], self.counts[r2, j]
            wi, wj = ni.to(self.dtype)[:, None], nj.to(self.dtype)[:, None]
            merged = (self.centroids[r2, i] * wi + self.centroids[r2, j] * wj) / (wi + wj)
            self.centroids[r2, j] = merged
            self.counts[r2, j] = ni + nj
            self.centroids[r2, i] = z2
            self.counts[r2, i] = 1
            self._set_distances(torch.cat([r2, r2]), torch.cat([i, j]))

    # ---------------------------------------------------------------------- state
    def state_dict(self) -> Dict:
        cpu = (lambda v: None if v is None else v.detach().cpu().clone())
        return {"capacity": self.capacity, "dtype": str(self.dtype).replace("torch.", ""),
                "keys": [list(k) for k in self.keys], "centroids": cpu(self.centroids),
                "counts": cpu(self.counts), "sizes": cpu(self.sizes), "dist": cpu(self.dist),
                "n_seen": self.n_seen}

    def load_state_dict(self, state: Dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"ClusterBuffer.load_state_dict: the state was saved with capacity="
                             f"{state['capacity']}, this buffer has capacity={self.capacity}")
        dev = self.device
        self.dtype = getattr(torch, state["dtype"])
        self.keys = [tuple(k) for k in state["keys"]]
        self._row = {k: r for r, k in enumerate(self.keys)}
        move = (lambda v: None if v is None else v.to(dev).clone())
        self.centroids, self.dist = move(state["centroids"]), move(state["dist"])
        self.counts, self.sizes = move(state["counts"]), move(state["sizes"])
        self.n_seen = int(state["n_seen"])
