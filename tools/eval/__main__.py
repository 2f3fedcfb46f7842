"""Accuracy of the served pipeline: ``python -m tools.eval --help`` (tools/eval/evaluate.py)."""
from tools.eval.evaluate import main

main()
