"""Where the CPU's unpadded path (model.Packing.group) puts each sequence for attention.

On the CPU, attention over packed tokens runs group by group: the sequences
sorted by length and cut into groups, each group padded to its longest and
attended in one call (model.SelfAttention.attend_padded). One group per
sequence pads nothing but makes a call per sequence, whose fixed cost
dominates once the matrix products are fast (bf16); one group for all pads
every sequence to the longest. The cut between them is chosen per batch by
dynamic programming over a cost: a group of n sequences, the longest T
long, costs n T^2 score positions a head, plus CALL positions for the call.
CALL was measured (docs/performance.md, "Attention on the CPU"). In bf16 the packed rows and
the groups' lengths are rounded up (rounding), so that oneDNN meets few shapes.
tests/test_unpadded.py checks that the groups give per-sequence attention's
outputs and gradients, and the cut against every other one on small cases.
"""

from dataclasses import dataclass

import torch

CALL = 8000  # what one attention call costs beyond its score positions, in score positions
ROWS, POSITIONS = 64, 8  # in bf16 on the CPU: packed rows a multiple of ROWS, groups of POSITIONS


def rounding(device, rounds=None):
    """(rows, positions): model.Packing rounds the packed tokens up to a multiple of rows, with copies of
    token 0 that no real token reads, and each attention group's length to a multiple of positions.
    In bf16 on the CPU (rounds None: decided from the device and autocast), oneDNN builds a kernel for
    each new shape of a matrix product, which costs more than the product: there (ROWS, POSITIONS), so
    that a run meets few shapes (docs/performance.md); elsewhere (1, 1)."""
    if rounds is None:
        rounds = device.type == "cpu" and torch.is_autocast_enabled("cpu")
    return (ROWS, POSITIONS) if rounds else (1, 1)


def round_up(n, multiple):
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def cheapest_groups(lengths, call, multiple=1):
    """The cheapest cut of the sequences, sorted by length, into groups: a list of sequence numbers
    (indices of lengths) per group, shortest first; each group padded to its longest, rounded up to a
    multiple. cost[j], the cheapest cut of the j shortest, is the least, over i < j, of cost[i] plus
    one group of sequences i to j - 1."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    cost, start = [0], [0]  # start[j]: where the last group of that cheapest cut begins
    for j in range(1, len(order) + 1):
        longest = round_up(lengths[order[j - 1]], multiple)
        costs = [cost[i] + call + (j - i) * longest ** 2 for i in range(j)]
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
    rows: torch.Tensor  # (M,): the packed rows that line the groups up, one past the last for padding;
    #                     M is the sum of n_g T_g
    back: torch.Tensor  # (N + R,): each packed row's row among the M
    sizes: list  # n_g T_g per group
    counts: list  # n_g per group
    keeps: list  # per group (n_g, 1, 1, T_g), True at real keys; None where all n_g are T_g long


def plan(lengths, x, multiple=1):
    """The Groups of sequences of these lengths, packed one after another in x's rows (model.Packing; the
    rows after the sequences' are rounding: they take row 0's attention, and row len(x) pads). Each
    group is padded to a multiple of `multiple` positions (rounding)."""
    packed, device = len(x), x.device
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    rows, back, groups = [], [0] * packed, Groups(None, None, [], [], [])
    for members in cheapest_groups(lengths, CALL, multiple):
        longest = round_up(max(lengths[b] for b in members), multiple)
        for b in members:
            n = lengths[b]
            back[starts[b]:starts[b] + n] = range(len(rows), len(rows) + n)
            rows += [*range(starts[b], starts[b] + n), *[packed] * (longest - n)]
        keep = torch.arange(longest) < torch.tensor([lengths[b] for b in members])[:, None]  # n, T
        groups.sizes.append(keep.numel())
        groups.counts.append(len(members))
        groups.keeps.append(None if keep.all() else keep[:, None, None, :].to(device))
    back[starts[-1]:] = [back[0]] * (packed - starts[-1])  # the rounding rows: row 0's attention
    groups.rows, groups.back = (torch.tensor(r, device=device) for r in (rows, back))
    return groups
