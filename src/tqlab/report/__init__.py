"""Reports: collect finished evaluations, compute statistics, draw trade-off plots, write Markdown."""
