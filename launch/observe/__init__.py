"""What a run reports: metrics.jsonl and the epoch line (logger), trackers, train.metrics, profiling, resources."""
