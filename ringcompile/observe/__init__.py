"""See a run: ring steps as profiler ranges, merged multi-rank traces, a timeline, and advice.

``collect`` writes each rank's ring calls while ``RINGCOMPILE_TRACE_DIR`` is set;
``chrome`` merges them into one Chrome/Perfetto trace (one process per rank); ``advice``
sets measured time and bubble beside the cost model's prediction and says what to change;
``timeline`` draws the per-rank picture (matplotlib, optional); ``cli`` is ``ringcompile trace``.
The profiler ranges themselves come from ``ringcompile.runtime.timing``. Nothing is imported
here, so tracing a run does not load the cost model into every rank.
"""
