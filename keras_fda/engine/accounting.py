"""Communication accounting: what a run sent, and what synchronous averaging would have.

Two figures are kept apart and always labelled:

* **paper bytes**, the formula of Theologitis et al. so that numbers compare
  with the paper: `(syncs + 1) * 2 * K * 4 * d + state_bytes * steps * K`
  (8 instead of 4 bytes per parameter when float64 weights are averaged)
  (each sync every worker uploads its model and downloads the average; the
  `+ 1` is the initial model broadcast, counted as in the authors' files).
  When a sync sends something else than the model (`sync_bytes`: a
  bfloat16 drift, averaged optimizer moments; see `keras_fda.outer`), the
  syncs count that and the broadcast still the model:
  `2 * K * (model_bytes + syncs * sync_bytes) + state_bytes * steps * K`.
* **wire bytes**, what a ring all-reduce actually moves: each worker sends
  `2 (K - 1) / K * payload` per all-reduce. Totals are over all workers, and
  include the control float the real drivers add to every step's message
  (`control_bytes`: the "still training" flag that keeps a worker that stops
  early from hanging the others). A quantized sync's payload (int8, int4:
  `gathered_bytes`) travels by a ring all-gather instead: each worker sends
  `(K - 1) * payload`.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class CommunicationStats:
    """Totals of one run.

    Attributes:
        num_workers: K.
        num_params: d, floats averaged by one synchronization.
        state_bytes: bytes each worker all-reduces per step to decide.
        steps: local steps taken (by each worker).
        syncs: synchronizations performed (the initial broadcast excluded).
        control_bytes: bytes each worker adds to every step's message for
            coordination (not part of the algorithm, so not in paper bytes).
        param_bytes: bytes per averaged parameter on the wire (4 for float32;
            8 when float64 weights are averaged in float64).
        sync_bytes: bytes each worker all-reduces at one synchronization,
            if not the model's (`keras_fda.outer.SyncState.sync_bytes`);
            None: `model_bytes`. The initial broadcast always sends the model.
        exchanges: state all-reduces made (None: one per step). Fewer with
            `FDACallback(exchange_every=...)`; state and control bytes are
            counted per exchange.
        gathered_bytes: the part of `sync_bytes` that is all-gathered, not
            all-reduced (a quantized drift and its scales).
    """

    num_workers: int
    num_params: int
    state_bytes: int
    steps: int
    syncs: int
    control_bytes: int = 0
    param_bytes: int = 4
    sync_bytes: int = None
    exchanges: int = None
    gathered_bytes: int = 0

    @property
    def state_exchanges(self):
        return self.steps if self.exchanges is None else self.exchanges

    @property
    def model_bytes(self):
        return self.param_bytes * self.num_params

    @property
    def bytes_per_sync(self):
        """Bytes each worker all-reduces at one synchronization."""
        return self.model_bytes if self.sync_bytes is None else self.sync_bytes

    @property
    def paper_bytes(self):
        """Bytes by the paper's formula (see the module docstring)."""
        k = self.num_workers
        models = self.model_bytes + self.syncs * self.bytes_per_sync
        return 2 * k * models + self.state_bytes * self.state_exchanges * k

    @property
    def synchronous_paper_bytes(self):
        """Paper bytes of averaging after every one of the same steps (same payload)."""
        k = self.num_workers
        return 2 * k * (self.model_bytes + self.steps * self.bytes_per_sync)

    @property
    def wire_bytes_per_worker(self):
        """Bytes one worker sends over ring collectives, broadcast included."""
        k = self.num_workers
        per_exchange = self.state_bytes + self.control_bytes
        reduced = (
            self.model_bytes + self.syncs * (self.bytes_per_sync - self.gathered_bytes)
            + self.state_exchanges * per_exchange
        )
        return 2.0 * (k - 1) / k * reduced + (k - 1) * self.syncs * self.gathered_bytes

    @property
    def wire_bytes(self):
        """Bytes all workers together send over ring collectives."""
        return self.num_workers * self.wire_bytes_per_worker

    @property
    def savings(self):
        """How many times more the synchronous baseline would send (paper bytes)."""
        return self.synchronous_paper_bytes / self.paper_bytes

    def summary(self):
        """One line for humans: FDA bytes vs synchronous bytes (K >= 2)."""
        mb = 1e6
        if self.num_workers == 1:
            # The formula would count a model upload per sync, but a lone worker has no one
            # to send to: claiming savings there would be a ratio of two fictions.
            return (
                f"One worker: nothing was sent (FDA communicates only between workers) "
                f"[d={self.num_params}, {self.steps} steps]"
            )
        return (
            f"FDA sent {self.paper_bytes / mb:.2f} MB; synchronous averaging would have "
            f"sent {self.synchronous_paper_bytes / mb:.2f} MB ({self.savings:.1f} times more) "
            f"[paper formula; K={self.num_workers}, d={self.num_params}, "
            f"{self.syncs} syncs in {self.steps} steps]"
        )
