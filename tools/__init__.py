"""Engineering tools for the PCB defect inspection model repository (run as `python -m tools.<name>`)."""
