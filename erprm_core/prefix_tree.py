"""Token sequences packed as a prefix tree: every distinct prefix once, for one forward pass over them all.

Candidates sampled for one question repeat each other: the question always, the first steps often, whole
solutions sometimes (a 100-question x 16-candidate pool of the tiny policy has 336k tokens and 47k distinct
prefixes). :func:`pack` lays the tree's nodes out in one sequence (a parent before its children);
:func:`ancestor_mask` is the attention mask under which each node sees exactly the tokens of its own sequence
(itself and its ancestors) and ``depth`` is its position id, so a causal LM computes at every node what it
would compute at that token of any sequence through it.

>>> tree = pack([[5, 6, 7], [5, 6, 8], [5, 9]])
>>> tree.input_ids, tree.depth, tree.paths
([5, 6, 7, 8, 9], [0, 1, 2, 2, 1], [[0, 1, 2], [0, 1, 3], [0, 4]])
>>> ancestor_mask(tree).int().tolist()[3]  # node 3 (token 8) sees 5, 6 and itself
[1, 1, 0, 1, 0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PackedTree:
    """``input_ids``/``depth``/``parent`` per node (parent -1 at a root); ``paths[s][i]``: the node of token
    ``i`` of sequence ``s``."""

    input_ids: list[int]
    depth: list[int]
    parent: list[int]
    paths: list[list[int]]


def pack(sequences: Sequence[Sequence[int]]) -> PackedTree:
    """The prefix tree of ``sequences``, nodes in order of first appearance."""
    tree = PackedTree([], [], [], [])
    children: dict[tuple[int, int], int] = {}
    for seq in sequences:
        path, node = [], -1
        for i, token in enumerate(seq):
            key = (node, int(token))
            if key not in children:
                children[key] = len(tree.input_ids)
                tree.input_ids.append(int(token))
                tree.depth.append(i)
                tree.parent.append(node)
            node = children[key]
            path.append(node)
        tree.paths.append(path)
    return tree


def ancestor_mask(tree: PackedTree) -> torch.Tensor:
    """(N, N) bool: row j is True at j and at each of its ancestors."""
    n = len(tree.input_ids)
    mask = torch.zeros((n, n), dtype=torch.bool)
    for j, p in enumerate(tree.parent):
        if p >= 0:
            mask[j] = mask[p]  # a parent precedes its child, so its row is complete
        mask[j, j] = True
    return mask


def chunks(sequences: Sequence[Sequence[int]], max_nodes: int) -> list[list[int]]:
    """Consecutive groups of sequence indices whose prefix tree has at most ``max_nodes`` nodes (a sequence
    longer than that is a group of its own).

    >>> chunks([[1, 2, 3], [1, 2, 4], [5, 6]], max_nodes=4)
    [[0, 1], [2]]
    """
    groups: list[list[int]] = []
    children: dict[tuple[int, int], int] = {}
    for s, seq in enumerate(sequences):
        node, shared = -1, 0
        while shared < len(seq) and (node, int(seq[shared])) in children:
            node = children[(node, int(seq[shared]))]
            shared += 1
        if not groups or (groups[-1] and len(children) + len(seq) - shared > max_nodes):
            groups.append([])
            children, node, shared = {}, -1, 0
        for token in seq[shared:]:
            node = children.setdefault((node, int(token)), len(children))
        groups[-1].append(s)
    return groups
