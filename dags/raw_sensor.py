"""A deferrable wait for the day's raw partition, so a late upstream delivery waits instead of
failing the run (and, through ``depends_on_past``, stalling every later day).

While the partition is missing the task defers to the triggerer (``FileTrigger`` globbing
``raw/dt=D/*.parquet``): no worker slot is held while it waits. It fails with a clear message after
``timeout``. Wiring helper only: the readiness rule lives in ``jobs.pipeline.raw_files``.
"""
from __future__ import annotations

from datetime import timedelta

from airflow.sdk import BaseSensorOperator


class RawPartitionSensor(BaseSensorOperator):
    """Wait (deferred) until ``$FMPIPE_HOME/raw/dt=<data interval start>`` holds Parquet files."""

    template_fields = ()

    def __init__(self, *, poke_interval: float = 300.0, timeout: float = 6 * 3600.0, **kwargs):
        super().__init__(poke_interval=poke_interval, timeout=timeout, mode="reschedule", **kwargs)

    @staticmethod
    def _day(context) -> str:
        return context["data_interval_start"].date().isoformat()

    def poke(self, context) -> bool:
        from jobs import pipeline
        return bool(pipeline.raw_files(self._day(context)))

    def execute(self, context) -> dict | None:
        from airflow.providers.standard.triggers.file import FileTrigger
        from jobs import pipeline
        day = self._day(context)
        if pipeline.raw_files(day):
            return {"date": day, "waited": False}
        self.defer(trigger=FileTrigger(filepath=pipeline.raw_glob(day), poke_interval=self.poke_interval),
                   method_name="execute_complete", timeout=timedelta(seconds=self.timeout))
        return None

    def execute_complete(self, context, event=None) -> dict:
        return {"date": self._day(context), "waited": True, "event": event}
