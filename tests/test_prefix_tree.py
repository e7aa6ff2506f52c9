"""erprm_core.prefix_tree: the packed tree, its ancestor mask and its chunks, on hand-made and random sequences."""

from __future__ import annotations

import doctest
import random

from erprm_core import prefix_tree


def test_module_examples():
    assert doctest.testmod(prefix_tree).failed == 0


def test_every_sequence_reads_back_through_its_path_and_sees_only_its_own_tokens():
    rng = random.Random(0)
    seqs = [[rng.randint(0, 3) for _ in range(rng.randint(1, 9))] for _ in range(40)] + [[1, 2], [1, 2]]
    tree = prefix_tree.pack(seqs)
    mask = prefix_tree.ancestor_mask(tree)
    assert len(tree.input_ids) == len({tuple(s[: i + 1]) for s in seqs for i in range(len(s))})
    for seq, path in zip(seqs, tree.paths, strict=True):
        assert [tree.input_ids[n] for n in path] == seq and [tree.depth[n] for n in path] == list(
            range(len(seq))
        )
        last = path[-1]
        assert sorted(mask[last].nonzero().flatten().tolist()) == sorted(
            path
        )  # itself and its ancestors only
    assert tree.paths[-1] == tree.paths[-2]  # a duplicate costs nothing


def test_chunks_keep_order_and_respect_the_node_budget():
    rng = random.Random(1)
    seqs = [[rng.randint(0, 2) for _ in range(rng.randint(1, 7))] for _ in range(60)]
    for budget in (1, 6, 20, 10_000):
        groups = prefix_tree.chunks(seqs, budget)
        assert [i for g in groups for i in g] == list(range(len(seqs)))
        for g in groups:
            size = len(prefix_tree.pack([seqs[i] for i in g]).input_ids)
            assert size <= budget or len(g) == 1
    assert len(prefix_tree.chunks(seqs, 10_000)) == 1
