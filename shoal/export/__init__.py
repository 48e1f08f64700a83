"""From a run directory to a usable model: consolidate any layout's checkpoint into one
module on one process (consolidate.py), write it out in a deployable format (formats.py),
sample text from it (generate.py), and score data sets in shards over worker processes
(predict.py). Nothing here starts a training world or imports the Trainer.
"""
