"""The selection worker: ranks uploaded rows as they become durable, selects the bank at close.

One thread, one queue. The journal's durable-record callbacks (fedserver.ingest) put each
chunk's decoded rows here; the worker hands them to the aggregator's selector
(``GlobalBankAggregator.add_rows``: the prefix merge computes separations as rows arrive), so
ranking never runs inside an rpc or under the lock acknowledgements take, and little is left
to do after the last chunk. When a round closes, a close task follows its last rows in the same
queue; the worker then finishes the round (``finish_round``: the selection and r_S), stores the
bank version and reports back. The time from the close task's arrival to the bank being stored
is the round's selection tail (``tail_seconds``); rows still queued at close (the backlog) are
part of it.

Only this thread touches the aggregator's selector; rpc threads touch only its upload streams
(GlobalBankAggregator.accept_chunk), so the two never share state.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from core.federated.aggregator import GlobalBankAggregator, RoundOutcome

logger = logging.getLogger(__name__)

__all__ = ["SelectionResult", "SelectionWorker"]


@dataclass(frozen=True)
class SelectionResult:
    """A closed round's selection: the outcome, or the error that stopped it.

    backlog_rows: rows still waiting to be ranked when the close task was queued.
    tail_seconds: from the close task being queued to the outcome (backlog + selection).
    """

    round: int
    outcome: RoundOutcome | None
    error: BaseException | None
    backlog_rows: int
    tail_seconds: float


@dataclass(frozen=True)
class _Rows:
    aggregator: GlobalBankAggregator
    round: int
    site_id: str
    rows: np.ndarray
    row_offset: int
    last: bool


@dataclass(frozen=True)
class _Close:
    round: int
    aggregator: GlobalBankAggregator
    rebuild: Callable[[], GlobalBankAggregator] | None
    done: Callable[[SelectionResult, GlobalBankAggregator], None]
    backlog_rows: int
    queued_at: float


class SelectionWorker:
    """A thread that owns the ranking and selection of the federation's rounds."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Rows | _Close | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._backlog = 0
        self._backlog_lock = threading.Lock()
        self._errors: dict[int, BaseException] = {}

    @property
    def backlog_rows(self) -> int:
        """Rows queued and not yet ranked."""
        return self._backlog

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fedserver-selection",
                                            daemon=True)
            self._thread.start()

    def feed(self, aggregator: GlobalBankAggregator, round_number: int, site_id: str,
             rows: np.ndarray, row_offset: int, *, last: bool = False) -> None:
        """Queue durable rows of ``site_id`` (in its upload order) for ranking; ``last``: they
        end the site's upload of the round (its ranking is finished right after them)."""
        with self._backlog_lock:
            self._backlog += rows.shape[0]
        self._queue.put(_Rows(aggregator, round_number, site_id, rows, row_offset, last))

    def close_round(
        self,
        round_number: int,
        aggregator: GlobalBankAggregator,
        done: Callable[[SelectionResult, GlobalBankAggregator], None],
        *,
        rebuild: Callable[[], GlobalBankAggregator] | None = None,
    ) -> None:
        """Select round ``round_number``'s bank once the rows queued before it are ranked.

        ``rebuild`` (for a round that cut sites off) makes a fresh aggregator without their
        rows, which is then selected from instead. ``done(result, aggregator)`` is called on
        the worker thread with the aggregator that selected.
        """
        self._queue.put(_Close(round_number, aggregator, rebuild, done, self._backlog,
                               time.perf_counter()))

    def stop(self) -> None:
        """Finish what is queued (a running selection completes), then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            if isinstance(task, _Rows):
                self._rank(task)
            else:
                self._select(task)

    def _rank(self, task: _Rows) -> None:
        try:
            if task.round not in self._errors:
                task.aggregator.add_rows(task.site_id, task.rows, task.row_offset)
                if task.last:
                    task.aggregator.site_finished(task.site_id)
        except Exception as error:  # the round cannot select correctly any more
            logger.exception("round %d: ranking rows of site %s failed", task.round,
                             task.site_id)
            self._errors[task.round] = error
        finally:
            with self._backlog_lock:
                self._backlog -= task.rows.shape[0]

    def _select(self, task: _Close) -> None:
        aggregator = task.aggregator
        outcome: RoundOutcome | None = None
        error = self._errors.pop(task.round, None)
        if error is None:
            try:
                if task.rebuild is not None:
                    aggregator = task.rebuild()
                outcome = aggregator.finish_round()
            except Exception as failure:
                logger.exception("round %d: selection failed", task.round)
                error = failure
        result = SelectionResult(task.round, outcome, error, task.backlog_rows,
                                 time.perf_counter() - task.queued_at)
        task.done(result, aggregator)
