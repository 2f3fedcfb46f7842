"""Train the PCB defect detector: ``python -m tools.train --help`` (the recipe is tools/train/recipe.py)."""
from tools.train.recipe import parse_args, train

train(parse_args())
