"""Test implementations: one that is cheap, one that fails, one that runs out of memory, one that is slow."""

import time

import torch
from torch import nn

import attnbench


class _Base(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(x)

    def flops_analytic(self, batch, height, width):
        return 2 * batch * height * width * self.proj.in_features ** 2


@attnbench.register("toy.proj", family="toy")
class ToyProj(_Base):
    """A linear projection standing in for attention."""

    def __init__(self, dim: int, heads: int, scale: float = 1.0, gated: bool = False):
        super().__init__(dim, heads)
        self.scale = scale

    def forward(self, x):
        return self.proj(x) * self.scale


@attnbench.register("toy.fail", family="toy")
class ToyFail(_Base):
    """Raises on grids wider than 8 tokens."""

    def forward(self, x):
        if x.shape[2] > 8:
            raise RuntimeError("toy failure on a wide grid")
        return self.proj(x)


@attnbench.register("toy.oom", family="toy")
class ToyOOM(_Base):
    """Runs out of memory on grids of 12 tokens or more per side."""

    def forward(self, x):
        if x.shape[1] >= 12:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 PiB (toy)")
        return self.proj(x)


@attnbench.register("toy.slow", family="toy")
class ToySlow(_Base):
    """Sleeps 0.1 ms per token: grid 8 = 6.4 ms, 16 = 26 ms, 32 = 102 ms a call."""

    def forward(self, x):
        time.sleep(x.shape[1] * x.shape[2] * 1e-4)
        return self.proj(x)


@attnbench.register("toy.picky", family="toy")
class ToyPicky(_Base):
    """Takes only even grids."""

    def supports(self, height, width):
        return None if height % 2 == 0 and width % 2 == 0 else f"grid {height}x{width} is odd"


@attnbench.register("toy.hang", family="toy")
class ToyHang(_Base):
    """Hangs (sleeps an hour) on real grids of 12 tokens or more per side (meta tensors, for counting, pass)."""

    def forward(self, x):
        if x.shape[1] >= 12 and x.device.type != "meta":
            time.sleep(3600)
        return self.proj(x)


@attnbench.register("toy.crash", family="toy")
class ToyCrash(_Base):
    """Kills its own process (as a segfault would) on real grids of 12 tokens or more per side."""

    def forward(self, x):
        if x.shape[1] >= 12 and x.device.type != "meta":
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return self.proj(x)


@attnbench.register("toy.lingers", family="toy")
class ToyLingers(_Base):
    """Closes its files (the worker's pipe among them), lingers 2 s, then exits with code 3: a dying
    process that is still alive when its parent sees the pipe close."""

    def forward(self, x):
        if x.device.type != "meta":
            import os
            import time as _time

            os.closerange(3, 4096)
            _time.sleep(2)
            os._exit(3)
        return self.proj(x)


@attnbench.register("toy.batchcap", family="toy")
class ToyBatchCap(_Base):
    """Runs out of memory above a batch of 4."""

    def forward(self, x):
        if x.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (toy: batch above 4)")
        return self.proj(x)


@attnbench.register("toy.flat", family="toy")
class Flat(torch.nn.Module):
    """Breaks the output contract: returns tokens (B, N, C) instead of (B, H, W, C)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(x).flatten(1, 2)


@attnbench.register("toy.gated", family="toy")
class ToyGated(_Base):
    """For killing a run at a known point: on real grids of 12 tokens or more per side, while the file named
    by $ATTNBENCH_TOY_GATE exists, creates "<that file>.reached" and waits (at most 10 minutes) until the
    gate file is removed. Without the variable (or the file) it is toy.proj."""

    def forward(self, x):
        import os

        gate = os.environ.get("ATTNBENCH_TOY_GATE")
        if gate and x.shape[1] >= 12 and x.device.type != "meta" and os.path.exists(gate):
            open(gate + ".reached", "w").close()
            deadline = time.monotonic() + 600
            while os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.02)
        return self.proj(x)
