"""Where the CPU's unpadded path (model.Packing.group) puts each sequence for attention.

On the CPU, attention over packed tokens runs group by group: the sequences
sorted by length and cut into groups, each group padded to its longest and
attended in one call (model.SelfAttention.attend_padded). One group per
sequence pads nothing but makes a call per sequence, whose fixed cost
dominates once the matrix products are fast (bf16); one group for all pads
every sequence to the longest. The cut between them is chosen per batch by
dynamic programming over a cost: a group of n sequences, the longest T
long, costs n T^2 score positions a head, plus CALL positions for the call.
CALL was measured (docs/performance.md, "Attention on the CPU").
tests/test_unpadded.py checks that the groups give per-sequence attention's
outputs and gradients, and the cut against every other one on small cases.
"""

from dataclasses import dataclass

import torch

CALL = 8000  # what one attention call costs beyond its score positions, in score positions


def cheapest_groups(lengths, call):
    """The cheapest cut of the sequences, sorted by length, into groups: a list of sequence numbers
    (indices of lengths) per group, shortest first. cost[j], the cheapest cut of the j shortest, is
    the least, over i < j, of cost[i] plus one group of sequences i to j - 1."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    cost, start = [0], [0]  # start[j]: where the last group of that cheapest cut begins
    for j in range(1, len(order) + 1):
        costs = [cost[i] + call + (j - i) * lengths[order[j - 1]] ** 2 for i in range(j)]
        start.append(min(range(j), key=costs.__getitem__))
        cost.append(costs[start[j]])
    groups, j = [], len(order)
    while j:
        groups.append(order[start[j]:j])
        j = start[j]
    return groups[::-1]


@dataclass
class Groups:
    """A batch's attention groups, as model.Packing.group and ungroup use them."""
    rows: torch.Tensor  # (M,): the packed tokens' rows that line the groups up, N for padding;
    #                     M is the sum of n_g T_g
    back: torch.Tensor  # (N,): each packed token's row among the M
    sizes: list  # n_g T_g per group
    counts: list  # n_g per group
    keeps: list  # per group (n_g, 1, 1, T_g), True at real keys; None where all n_g are T_g long


def plan(lengths, device):
    """The Groups of sequences of these lengths, packed one after another (model.Packing)."""
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    rows, back, groups = [], [0] * starts[-1], Groups(None, None, [], [], [])
    for members in cheapest_groups(lengths, CALL):
        longest = max(lengths[b] for b in members)
        for b in members:
            n = lengths[b]
            back[starts[b]:starts[b] + n] = range(len(rows), len(rows) + n)
            rows += [*range(starts[b], starts[b] + n), *[starts[-1]] * (longest - n)]
        keep = torch.arange(longest) < torch.tensor([lengths[b] for b in members])[:, None]  # n, T
        groups.sizes.append(keep.numel())
        groups.counts.append(len(members))
        groups.keeps.append(None if keep.all() else keep[:, None, None, :].to(device))
    groups.rows, groups.back = (torch.tensor(r, device=device) for r in (rows, back))
    return groups
