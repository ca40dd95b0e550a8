"""pytorch-metric-learning miners: not wired yet.

They will run on metricops.mine_triplets (issue 3), which another branch is
building; until then constructing one raises NotImplementedError.
"""

from __future__ import annotations

_MESSAGE = "metricops.pml.miners needs metricops.mine_triplets (issue 3)"


class BatchHardMiner:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(_MESSAGE)


class TripletMarginMiner:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(_MESSAGE)
