"""NeuroGym tasks (optional extra ``pip install kpflow[neurogym]``) as kpflow tasks.

Each trial of the batch is a stream of consecutive NeuroGym trials of one environment, cut to
``seq_len`` steps; observations become the inputs and ground-truth actions the cross-entropy targets.
The environment's random state is seeded from the batch seed, so batches are reproducible.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Task, TaskBatch


def _import_neurogym():
    try:
        import neurogym
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ImportError("NeuroGym tasks need the optional extra: pip install 'kpflow[neurogym]'") from err
    return neurogym


class NeuroGymTask(Task):
    """Wrap the NeuroGym environment ``env`` (e.g. ``"PerceptualDecisionMaking-v0"``)."""

    name = "neurogym"

    def __init__(self, env: str = "PerceptualDecisionMaking-v0", dt: int = 100, seq_len: int = 100, **env_kwargs):
        ngym = _import_neurogym()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self._env = ngym.make(env, dt=dt, **env_kwargs)
            except Exception as err:
                raise ValueError(f"NeuroGym could not make environment {env!r}: {err}. "
                                 "List the valid names with neurogym.all_envs().") from err
        self.env, self.dt, self.seq_len = str(env), int(dt), int(seq_len)
        self.env_kwargs = dict(env_kwargs)
        self.input_dim = int(np.prod(self._env.observation_space.shape))
        self.output_dim = int(self._env.action_space.n)
        self.loss = "ce"

    def _generate(self, batch_size, gen):
        env = self._env.unwrapped
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        env.seed(seed)
        self._env.reset(seed=seed)
        inputs = np.zeros((batch_size, self.seq_len, self.input_dim), dtype=np.float32)
        targets = np.zeros((batch_size, self.seq_len), dtype=np.int64)
        for b in range(batch_size):
            filled = 0
            while filled < self.seq_len:
                env.new_trial()
                ob, gt = np.asarray(env.ob).reshape(len(env.ob), -1), np.asarray(env.gt).reshape(len(env.gt))
                n = min(len(ob), self.seq_len - filled)
                inputs[b, filled:filled + n], targets[b, filled:filled + n] = ob[:n], gt[:n]
                filled += n
        return TaskBatch(inputs=torch.from_numpy(inputs), targets=torch.from_numpy(targets), loss="ce")
