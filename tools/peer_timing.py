"""Step timing for the peers (transformers' Trainer and TRL's trainers), shared by the benchmarks."""
from __future__ import annotations

import time


def step_timer():
    """A `TrainerCallback` that records each optimiser step's wall time in `.times` and prints it."""
    import transformers

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)
            print(f"peer step {len(self.times) - 1}: {self.times[-1]:.1f} s", flush=True)

    return StepTimer()
