"""`SimulationHistory`: what one run of the simulator did, step by step and per evaluation."""

import csv
import dataclasses

import numpy as np

from keras_fda.engine.accounting import CommunicationStats


@dataclasses.dataclass
class SimulationHistory:
    """What one simulated run did.

    Attributes:
        trigger: the trigger's name (e.g. "fda-linear", "periodic-8").
        threshold: the trigger's threshold (Theta, tau, ...).
        num_workers: K.
        num_params: d, floats averaged per synchronization.
        state_bytes: bytes each worker all-reduces per step to decide.
        steps_per_epoch: `total samples // (batch_size * K)`.
        evaluations: one column per quantity (a dict of equally long numpy
            arrays), one row per evaluation, step 0 included: `step`, `epoch`,
            `syncs`, `paper_bytes`, `wire_bytes`, `train_loss` (mean over the
            workers since the last evaluation), `seconds` (training time so
            far) and the compiled loss and metrics of the averaged model on
            the validation data (e.g. `loss`, `accuracy`). The counts are
            those of `communication(step)`: the last row (step == the run's
            steps) includes the run's final sync (`final_syncs`), since that
            sync's all-reduce is what yields the average the row evaluates.
        statistic: the trigger's statistic after every step (`fda/variance`).
        synced: whether the trigger's check after each step synchronized
            (the step's batch logs under `FDACallback`); the final sync is
            not in it.
        step_seconds: wall time of every step (all K workers; the first
            includes tracing).
        sync_bytes: bytes each worker all-reduces at one sync (see
            `keras_fda.outer.SyncState.sync_bytes`); None: the model's.
        gathered_bytes: the part of `sync_bytes` that is all-gathered (a
            quantized drift; `CommunicationStats.gathered_bytes`).
        final_syncs: syncs made after the last step (0 or 1), as a fit with
            `FDACallback` ends: the pending decision of `lag=1`, else one sync
            if the workers trained since the last. `communication().syncs`
            (`synced.sum() + final_syncs`) is what `FDACallback`'s
            `communication.syncs` counts for the same run.
    """

    trigger: str
    threshold: float
    num_workers: int
    num_params: int
    state_bytes: int
    steps_per_epoch: int
    evaluations: dict
    statistic: np.ndarray
    synced: np.ndarray
    step_seconds: np.ndarray
    sync_bytes: int = None
    gathered_bytes: int = 0
    final_syncs: int = 0

    def communication(self, step=None):
        """`CommunicationStats` after `step` steps (default: the whole run).

        At the run's last step (and by default) it includes the final sync,
        as `FDACallback.communication` after fit does.
        """
        num_steps = len(self.synced)
        step = num_steps if step is None else int(step)
        syncs = int(np.sum(self.synced[:step]))
        if step >= num_steps:
            syncs += self.final_syncs
        return CommunicationStats(
            num_workers=self.num_workers,
            num_params=self.num_params,
            state_bytes=self.state_bytes,
            steps=step,
            syncs=syncs,
            sync_bytes=self.sync_bytes,
            gathered_bytes=self.gathered_bytes,
        )

    def evaluation_row(self, step, train_loss, metrics):
        """The row of `evaluations` at `step`: the counts and time so far, and `metrics`."""
        stats = self.communication(step)
        return {
            "step": step,
            "epoch": step / self.steps_per_epoch,
            "syncs": stats.syncs,
            "paper_bytes": stats.paper_bytes,
            "wire_bytes": stats.wire_bytes,
            "train_loss": train_loss,
            "seconds": float(np.sum(self.step_seconds[:step])),
            **metrics,
        }

    def first_reaching(self, metric, target):
        """The first evaluation with `metric >= target`, as a dict, or None."""
        if metric not in self.evaluations:
            raise ValueError(f"No metric {metric!r}; the history has {sorted(self.evaluations)}.")
        hits = np.flatnonzero(self.evaluations[metric] >= target)
        if not hits.size:
            return None
        return {name: column[hits[0]].item() for name, column in self.evaluations.items()}

    def to_csv(self, path):
        """Writes `evaluations` to `path`, one row per evaluation."""
        names = list(self.evaluations)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(names)
            writer.writerows(zip(*(self.evaluations[n].tolist() for n in names)))
