"""What a user sees of a run: driver console lines, experiment trackers, the metrics watcher and
the HTML report. Nothing here changes a number a run computes."""
