"""The lab: ablation grids, measurements, results, reports and the command line."""
